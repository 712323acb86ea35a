"""Checks that need no Ray, run before anything starts: credentials in URLs, where
the output is, the ``--prompt`` template, every input file's columns and their types,
unique ids. Each refusal is a ConfigError naming what was expected and what was found.
"""

from __future__ import annotations

from hired_batch.config import SUPPORTED_MODEL_TYPES, ColumnSpec, ConfigError, JobConfig
from hired_batch.job.id_check import duplicate_ids_error, null_ids_error
from hired_batch.job.image_folder import check_image_folder_columns, image_folder
from hired_batch.job.output import check_checkpoint_input, check_output_is_fresh, check_places_apart, check_writable
from hired_batch.job.sources import ROW_ID, is_hf_job, type_kind


def check_engine(job: JobConfig) -> None:
    """Options one engine lacks, refused naming the engine; ``--engine vllm`` needs vLLM here."""
    m, r = job.model, job.resources
    if m.engine == "hf":
        for flag, given in (
            ("--tensor-parallel-size", r.tensor_parallel_size > 1),
            ("--max-model-len", m.max_model_len is not None),
        ):
            if given:
                raise ConfigError(f"{flag} is a vLLM option: add --engine vllm, or drop it for the hf engine")
        return
    from hired_batch.engine.vllm import check_installed
    from hired_batch.engine.vllm.options import check_cpu_head_size
    from hired_batch.job.resources import generation_on_cpu

    check_installed()
    if generation_on_cpu(r):  # vLLM on CPU: an unsupported head size kills the engine at the first row
        check_cpu_head_size(m.path)
    if job.selection.save_indices:
        raise ConfigError(
            "--save-indices is not available with --engine vllm (vLLM does not return which tokens "
            "the plugin kept): use --engine hf for it"
        )
    if job.selection.mode != "exact":
        raise ConfigError(
            f"--mode {job.selection.mode} is not available with --engine vllm: vLLM places an image's "
            "placeholders before the model runs, and reference mode's count depends on the attention"
        )


def preflight(job: JobConfig) -> None:
    """Checks that need no Ray: output location, prompt template, every input file's
    columns and their types, unique ids."""
    from hired_batch.job import sources
    from hired_batch.job.stages import check_prompt

    for url in (*job.inputs, job.output, job.checkpoint or ""):
        sources.check_no_inline_credentials(url)
    check_places_apart(job)
    check_output_is_fresh(job)
    check_writable(job)
    check_prompt(job.columns)  # the --prompt template, for callers that built the JobConfig themselves
    check_engine(job)
    check_checkpoint_input(job)
    if is_hf_job(job):
        return  # columns are checked once the dataset is loaded
    folder = image_folder(job)
    if folder:
        return check_image_folder_columns(folder[0], job.columns, needed_columns(job.columns))
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    footers = sources.parquet_footers(files, job.s3)  # footers only, read once for every check below
    schemas = {f: schema for f, (schema, _) in footers.items()}
    check_input_schemas(schemas, job.columns)
    check_question_type(schemas, job.columns)
    if ROW_ID in needed_columns(job.columns):
        raise ConfigError(f"input column {ROW_ID!r} cannot be read as data: the output's id column has that name")
    check_unique_ids(footers, job)


def check_input_schemas(schemas: dict, c: ColumnSpec) -> None:
    """Refuse input files the job could not read alike (``schemas``: {file: Arrow schema}).

    Every file must hold every needed column, each column must have one kind of type
    in all files (``sources.type_kind``: widths may differ), and the id column must be
    in every file or in none. Extra columns are never read, so they may differ freely.
    """
    needed = needed_columns(c)
    for f, schema in schemas.items():
        check_columns(needed, schema.names, f)
    for name in needed:
        _check_one_kind(name, {f: s.field(name).type for f, s in schemas.items()})
    has_id = [f for f, s in schemas.items() if c.id_column in s.names]
    if has_id and len(has_id) < len(schemas):
        lacking = next(f for f in schemas if f not in has_id)
        raise ConfigError(
            f"id column {c.id_column!r} is in {has_id[0]} but not in {lacking}; every input file "
            "needs it, or none (then ids are generated as FILE#ROW)"
        )


QUESTION_KINDS = ("string", "binary")  # ``sources.type_kind`` of the types a question can be read from (binary: UTF-8)


def check_question_type(schemas: dict, c: ColumnSpec) -> None:
    """Refuse a question column whose Arrow type can never hold text (numbers, lists,
    structs, dates...): every row would fail. All-null columns pass (each row then says
    the question is missing). ``schemas``: {file: Arrow schema}, as ``preflight`` read them."""
    import pyarrow as pa

    from hired_batch.job.ask import is_question_list

    if c.question_column is None:
        return
    for f, schema in schemas.items():
        t = schema.field(c.question_column).type
        value = t.value_type if pa.types.is_dictionary(t) else t  # a categorical column holds its values' type
        if is_question_list(value):  # list<string>: each row's own questions (job/ask.py)
            value = value.value_type
        if not pa.types.is_null(value) and type_kind(value) not in QUESTION_KINDS:
            raise ConfigError(
                f"question column {c.question_column!r} is {t} in {f}; expected text (string, or "
                "UTF-8 binary, or a list of them): name the column that holds the questions with --question-column"
            )


def _check_one_kind(name: str, types: dict) -> None:
    """``types``: {file: Arrow type of column ``name``}; all-null columns fit any kind."""
    import pyarrow as pa

    typed = {f: t for f, t in types.items() if not pa.types.is_null(t)}
    first = next(iter(typed), None)
    for f, t in typed.items():
        if type_kind(t) != type_kind(typed[first]):
            raise ConfigError(
                f"column {name!r} is {typed[first]} in {first} but {t} in {f}; a column the job reads "
                "must have one kind of type in every input file (only widths may differ, e.g. "
                "string/large_string, int32/int64)"
            )


def needed_columns(c: ColumnSpec) -> list[str]:
    cols = [c.image_column] + ([c.question_column] if c.question_column else [])
    return list(dict.fromkeys(cols + list(c.prompt_columns) + list(c.keep_columns)))


def check_columns(needed, names, where) -> None:
    missing = [n for n in needed if n not in names]
    if missing:
        raise ConfigError(f"column(s) {missing} not found in {where}; available columns: {sorted(names)}")


def refuse_duplicates(ids, where, c: ColumnSpec = ColumnSpec()) -> None:
    """ConfigError when an id occurs twice in ``ids`` (read from ``where`` under mapping ``c``)."""
    seen, dupes = set(), []
    for i in ids:
        if i in seen:
            dupes.append(i)
        seen.add(i)
    if dupes:
        raise duplicate_ids_error(len(dupes), dupes[:3], where, c)


def refuse_null_ids(ids, where: str, c: ColumnSpec) -> None:
    """ConfigError naming the first row of ``where`` whose id is null (it would be written
    as the text 'None', and clash with a real 'None')."""
    nulls = [n for n, i in enumerate(ids) if i is None]
    if nulls:
        raise null_ids_error(nulls[0], len(nulls), where, c)


def check_unique_ids(footers: dict, job: JobConfig) -> None:
    """Refuse null and duplicate ids across the Parquet files of a small input, here
    before Ray starts; a larger one is checked by Ray tasks once Ray is up
    (``id_check``: the driver never holds its ids).

    ``footers``: {file: (Arrow schema, rows)} of every input file, as ``preflight`` read
    them; ``check_input_schemas`` has made sure the id column is in all of them or in none.
    """
    from hired_batch.job import id_check

    if not id_check.has_ids({f: s for f, (s, _) in footers.items()}, job.columns):
        return  # generated file#row ids are unique by construction
    if not id_check.checked_on_ray(sum(n for _, n in footers.values())):
        id_check.check_ids_in_driver(list(footers), job)
    else:
        id_check.remember_large_input(job, list(footers))  # the Ray pass reads these, not the footers again


def check_model(path: str) -> None:
    """Fail fast on a model that cannot be read (before any Ray work)."""
    import os

    from transformers import AutoConfig

    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"model directory {path!r} does not exist")
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read model {path!r}: {str(e).splitlines()[0]}") from None
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model {path!r} is {cfg.model_type!r}; expected {' or '.join(SUPPORTED_MODEL_TYPES)}")


def check_budget_tokens(path: str, selection) -> None:
    """Refuse a ``--budget-tokens`` above the most visual tokens any image can have with
    this checkpoint (it would silently keep every token), and a budget the selector
    cannot run on the image with the most crops (``Selector.check_budget``). Reads the
    config only."""
    if selection.selector == "full":
        return
    from transformers import AutoConfig

    from hired_batch.engine import selectors
    from hired_batch.engine.token_plan import Geometry, largest_grid, max_patch_tokens, n_parts

    geo = Geometry.from_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    selectors.get(selection.selector).check_budget(selection, geo.n_tokens, n_parts(largest_grid(geo)))
    if selection.budget_tokens is None:
        return
    most = max_patch_tokens(geo)
    if int(selection.budget_tokens) > most:
        grid = largest_grid(geo)
        crops = "1 crop" if grid is None else f"1 + {grid[0]}x{grid[1]} crops, its largest anyres grid"
        raise ConfigError(
            f"--budget-tokens {selection.budget_tokens} is more than any image has with {path}: "
            f"at most {most} visual tokens ({crops}, x {geo.n_tokens} patches), so every token "
            "would be kept; give at most that, or --selector full to keep them all"
        )


def check_system_prompt(path: str, system_prompt: str | None) -> None:
    """Fail fast when the model's chat template refuses or drops ``--system-prompt``
    (loads the processor only; ConfigError from ``checkpoint.check_system_prompt``)."""
    if system_prompt is None:
        return
    from hired_batch.engine.weights import Preprocessor

    Preprocessor.from_pretrained(path, system_prompt)


def check_constraints(job: JobConfig) -> None:
    """Fail fast on a constraint xgrammar cannot compile against the model's tokenizer, or one
    that contradicts another option (``engine.constraints.check_options``); say at start when
    a --json-schema cannot be typed, so the output has no ``answer_struct``."""
    import sys

    from hired_batch.engine.constraints import check_compiles
    from hired_batch.engine.generation_rules import row_generation
    from hired_batch.job.answer_struct import untyped_reason

    # the job's options, and each --ask question's own (its constraint replaces the job's)
    named = [("--json-schema", None, job.generation)]
    named += [(f"--ask {a.name}", a, row_generation(job.generation, a.overrides)) for a in job.columns.ask]
    for what, a, g in named:
        if g is None:  # the question sets nothing of its own
            continue
        try:
            check_compiles(job.model.path, g, job.columns.task)
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}" if a is not None else str(e)) from None
        why = untyped_reason(g.json_schema) if g.json_schema is not None else None
        if why:
            print(f"note: {what} has no one Arrow type ({why}): the output keeps only the answer text", file=sys.stderr)
