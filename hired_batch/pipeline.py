"""``build_pipeline(job)``: read -> preprocess (CPU) -> generate (GPU actors) -> Parquet.

Every resource knob (batch size, actor counts, GPUs, CPUs, rows per file) is set here
and nowhere else. Configuration problems are found by ``check_job`` before Ray runs
anything.

This module does not parse flags (``runner.py``) and does not decode or generate
(``stages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.data import DecodeLimits
from hired_batch.sources import ROW_ID, S3Options
from hired_batch.stages import ColumnSpec


@dataclass(frozen=True)
class Resources:
    """How much of the cluster the job uses."""

    batch_size: int | str = 8  # items per generate call, or "auto": the most that fit memory_limit
    window: int = 64  # with "auto": rows per Ray batch, grouped by visual-token count inside
    memory_limit: str | None = None  # with "auto": bytes a batch may use ("24GB"); None = free device memory
    min_actors: int = 1  # GPU actors at least (autoscaling lower bound)
    max_actors: int = 1  # GPU actors at most
    gpus_per_actor: float = 1.0  # GPUs each generation actor reserves (0 on CPU-only clusters)
    generate_cpus: float = 0.25  # CPUs each generation actor reserves (it mostly waits on its GPU)
    read_cpus: float = 0.25  # CPUs per read task (I/O bound)
    preprocess_cpus: float = 0.5  # CPUs per preprocessing actor
    preprocess_actors: int = 1  # preprocessing actors (they overlap GPU work)
    generate_memory: str | None = None  # host memory each generation actor reserves in Ray ("16GB"); None = none
    rows_per_file: int = 10_000  # output rows per Parquet file at most

    def check(self) -> "Resources":
        """Raise ValueError on an out-of-range field; return self."""
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {self.batch_size!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not (1 <= self.min_actors <= self.max_actors):
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.gpus_per_actor < 0 or self.preprocess_cpus <= 0 or self.preprocess_actors < 1:
            raise ValueError("gpus_per_actor must be >= 0, preprocess_cpus > 0, preprocess_actors >= 1")
        if self.generate_cpus < 0 or self.read_cpus <= 0:
            raise ValueError("generate_cpus must be >= 0 and read_cpus > 0")
        if self.generate_memory is not None:
            from hired_batch.memory import parse_bytes

            parse_bytes(self.generate_memory)  # raises ValueError naming the expected form
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        return self


@dataclass(frozen=True)
class JobConfig:
    """Everything one batch job needs."""

    inputs: tuple = ()  # Parquet files/dirs/globs (local or s3://), hf:NAME[:CONFIG][:SPLIT], or a save_to_disk dir
    output: str = ""  # output directory, local or s3://
    columns: ColumnSpec = field(default_factory=ColumnSpec)  # input column mapping
    model: ModelConfig = field(default_factory=ModelConfig)  # checkpoint, dtype, device
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # HiRED knobs
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # decoding knobs
    resources: Resources = field(default_factory=Resources)  # cluster usage
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # per-row input limits
    s3: S3Options = field(default_factory=S3Options)  # S3 endpoint
    checkpoint: str | None = None  # Ray Data checkpoint dir (local or s3://) for resume
    overwrite: bool = False  # delete Parquet files already in the output dir before running


def check_output_not_inside_input(inputs, output: str) -> None:
    """Writing into the input tree would re-read our own answers next time."""
    import os

    out = os.path.abspath(output) if "://" not in output else output.rstrip("/")
    for spec in inputs:
        src = os.path.abspath(spec) if "://" not in spec and not spec.startswith("hf:") else spec.rstrip("/")
        if out == src or out.startswith(src.rstrip("/") + "/"):
            raise ValueError(f"output {output!r} is inside input {spec!r}; choose a separate directory")


def is_hf_job(job: JobConfig) -> bool:
    """True when the job reads one Hugging Face dataset rather than Parquet."""
    from hired_batch import sources

    return len(job.inputs) == 1 and sources.is_hf_input(job.inputs[0])


def preflight(job: JobConfig) -> None:
    """Checks that need no Ray: output location, prompt template, every input file's
    columns and their types, unique ids."""
    from hired_batch import sources

    for url in (*job.inputs, job.output, job.checkpoint or ""):
        sources.check_no_inline_credentials(url)
    check_output_not_inside_input(job.inputs, job.output)
    check_output_is_fresh(job)
    job.columns.check()  # the --prompt template, for callers that built the JobConfig themselves
    if is_hf_job(job):
        return  # columns are checked once the dataset is loaded
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    schemas = sources.parquet_schemas(files, job.s3)  # footers only, read once for every check below
    check_input_schemas(schemas, job.columns)
    if ROW_ID in _needed_columns(job.columns):
        raise ValueError(f"input column {ROW_ID!r} cannot be read as data: the output's id column has that name")
    check_unique_ids(schemas, job)


def check_input_schemas(schemas: dict, c: ColumnSpec) -> None:
    """Refuse input files the job could not read alike (``schemas``: {file: Arrow schema}).

    Every file must hold every needed column, each column must have one kind of type
    in all files (``sources.type_kind``: widths may differ), and the id column must be
    in every file or in none. Extra columns are never read, so they may differ freely.
    """
    needed = _needed_columns(c)
    for f, schema in schemas.items():
        _check_columns(needed, schema.names, f)
    for name in needed:
        _check_one_kind(name, {f: s.field(name).type for f, s in schemas.items()})
    has_id = [f for f, s in schemas.items() if c.id_column in s.names]
    if has_id and len(has_id) < len(schemas):
        lacking = next(f for f in schemas if f not in has_id)
        raise ValueError(f"id column {c.id_column!r} is in {has_id[0]} but not in {lacking}; every input file "
                         "needs it, or none (then ids are generated as FILE#ROW)")


def _check_one_kind(name: str, types: dict) -> None:
    """``types``: {file: Arrow type of column ``name``}; all-null columns fit any kind."""
    import pyarrow as pa

    from hired_batch.sources import type_kind

    typed = {f: t for f, t in types.items() if not pa.types.is_null(t)}
    first = next(iter(typed), None)
    for f, t in typed.items():
        if type_kind(t) != type_kind(typed[first]):
            raise ValueError(f"column {name!r} is {typed[first]} in {first} but {t} in {f}; a column the job reads "
                             "must have one kind of type in every input file (only widths may differ, e.g. "
                             "string/large_string, int32/int64)")


def existing_outputs(job: JobConfig) -> list[str]:
    """Parquet files already under the output directory."""
    import fsspec

    from hired_batch import sources

    fs, _, (root,) = fsspec.get_fs_token_paths(job.output, storage_options=sources.fsspec_options(job.s3))
    return [f for f in fs.find(root) if f.endswith(".parquet")] if fs.isdir(root) else []


def check_output_is_fresh(job: JobConfig) -> None:
    """Parquet writes append: a rerun into a used directory would duplicate rows.

    Allowed: an empty/new directory, ``--checkpoint`` (resume adds only missing rows),
    or ``--overwrite`` (old files are deleted first, by ``clear_output``).
    """
    old = existing_outputs(job)
    if old and not job.checkpoint and not job.overwrite:
        raise ValueError(f"output {job.output!r} already holds {len(old)} Parquet file(s); use a new directory, "
                         "--overwrite to replace them, or --checkpoint to resume that run")


def clear_output(job: JobConfig) -> None:
    """Delete the Parquet files of an earlier run (``--overwrite`` only)."""
    import fsspec

    from hired_batch import sources

    if job.overwrite:
        fs = fsspec.get_fs_token_paths(job.output, storage_options=sources.fsspec_options(job.s3))[0]
        for f in existing_outputs(job):
            fs.rm(f)


def _needed_columns(c: ColumnSpec) -> list[str]:
    cols = [c.image_column] + ([c.question_column] if c.question_column else [])
    return list(dict.fromkeys(cols + list(c.prompt_columns) + list(c.keep_columns)))


def read_input(job: JobConfig):
    """Dataset of the needed columns plus a unique string ``id`` column.

    The CPU reservations are sized so that, on a 2-CPU machine, a read task, one
    preprocessing actor, one generation actor and Ray's checkpoint-filter actor (1 CPU)
    fit together: an oversubscribed actor pool would wait forever.
    """
    from hired_batch import sources

    c = job.columns
    needed = _needed_columns(c)
    if is_hf_job(job):
        return _read_hf(job.inputs[0], c, needed)
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    names = sources.parquet_schema_names(files[0], job.s3)
    _check_columns(needed, names, files[0])
    id_col = c.id_column if c.id_column in names else None
    return sources.read_parquet_rows(files, needed, id_col, job.s3, num_cpus=job.resources.read_cpus)


def _read_hf(spec: str, c: ColumnSpec, needed: list[str]):
    import pyarrow as pa
    import ray

    from hired_batch import sources

    table = sources.load_hf_table(spec)
    _check_columns(needed, table.column_names, spec)
    if c.id_column in table.column_names:
        ids = table.column(c.id_column).cast(pa.string())
        _refuse_duplicates(ids.to_pylist(), spec)
    else:
        ids = pa.array([f"row#{i}" for i in range(table.num_rows)], pa.string())
    table = table.select(needed).append_column(sources.ROW_ID, ids)
    return ray.data.from_arrow(table)


def _refuse_duplicates(ids, where) -> None:
    seen, dupes = set(), []
    for i in ids:
        if i in seen:
            dupes.append(i)
        seen.add(i)
    if dupes:
        raise ValueError(f"{len(dupes)} duplicate id(s) in {where}, e.g. {dupes[:3]}; ids must be unique "
                         "(drop --id-column to use generated file#row ids)")


def check_unique_ids(schemas: dict, job: JobConfig) -> None:
    """Refuse duplicate ids across the Parquet files (reads only the id column, as text).

    ``schemas``: {file: Arrow schema} of every input file, as ``preflight`` read them;
    ``check_input_schemas`` has made sure the id column is in all of them or in none.
    """
    import pyarrow.parquet as pq

    from hired_batch import sources

    files = list(schemas)
    if not all(job.columns.id_column in s.names for s in schemas.values()):
        return  # generated file#row ids are unique by construction
    ids = []
    for f in files:
        fs, p = sources.pyarrow_fs(f, job.s3)
        ids += pq.read_table(p, columns=[job.columns.id_column], filesystem=fs).column(0).cast("string").to_pylist()
    _refuse_duplicates(ids, f"{len(files)} input file(s)")


def _check_columns(needed, names, where) -> None:
    missing = [n for n in needed if n not in names]
    if missing:
        raise ValueError(f"column(s) {missing} not found in {where}; available columns: {sorted(names)}")


def build_pipeline(job: JobConfig):
    """The job as a lazy Ray Dataset of output rows (call ``write_output`` to run it)."""
    from dataclasses import replace

    from ray.data import ActorPoolStrategy

    from hired_batch.stages import GenerateStage, PreprocessStage

    r = job.resources.check()
    ds = read_input(job)
    columns = replace(job.columns, id_column=ROW_ID)
    # 1) CPU: decode, validate, tokenize, anyres pixels (overlaps the GPU stage)
    ds = ds.map_batches(
        PreprocessStage, fn_constructor_args=(job.model.path, columns, job.limits),
        batch_size=_preprocess_batch(r), batch_format="numpy", num_cpus=r.preprocess_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=r.preprocess_actors),
    )
    # 2) GPU actors: the model loads once per actor; large batches
    ds = ds.map_batches(
        GenerateStage, fn_constructor_args=(job.model, job.selection, job.generation, columns.keep_columns),
        fn_constructor_kwargs=dict(batch_size=r.batch_size, memory_limit=r.memory_limit),
        batch_size=r.window if r.batch_size == "auto" else r.batch_size,
        batch_format="numpy", **generate_remote_args(r),
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1:
        # a dead actor is restarted and its batch retried, which exactly-once relies on.
        compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
    )
    return ds


def _preprocess_batch(r: Resources) -> int:
    """Rows per preprocessing call: one generate batch (at most 16), so the first
    generate call waits for its own rows only, not for a larger preprocessed block."""
    return min(16, r.batch_size) if isinstance(r.batch_size, int) else 16


def generate_remote_args(r: Resources) -> dict:
    """Ray resources of a generation actor: GPUs, CPUs, host memory if asked, threads."""
    args = dict(num_gpus=r.gpus_per_actor, num_cpus=r.generate_cpus)
    if r.generate_memory is not None:
        from hired_batch.memory import parse_bytes

        args["memory"] = parse_bytes(r.generate_memory)
        _check_schedulable_memory(args["memory"])
    return {**args, **_cpu_threads(r)}


def _check_schedulable_memory(want: int) -> None:
    """Refuse a host-memory reservation no node can give (the actor would wait forever)."""
    import ray

    if not ray.is_initialized():
        return
    most = _largest_node("memory", 0)
    if want > most:
        raise ValueError(f"--generate-memory {want / 1e9:.1f} GB is more than any node can reserve "
                         f"(largest: {most / 1e9:.1f} GB of Ray 'memory')")


def _cpu_threads(r: Resources) -> dict:
    """CPU-only generation actors: torch threads = the largest node's CPUs (Ray remote args).

    Ray sets OMP_NUM_THREADS to floor(num_cpus), at least 1, in a worker that has none,
    so a 0.25-CPU actor would run torch on one thread; without a GPU it does all the
    model's work and is the bottleneck. GPU actors keep Ray's default (they wait on the GPU).
    """
    if r.gpus_per_actor:
        return {}
    cpus = int(_largest_node("CPU", 1))
    return dict(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(cpus, 1))}})


def _largest_node(resource: str, missing: float) -> float:
    """The most of a Ray resource one live node has (``missing`` where a node lists none)."""
    import ray

    return max((n["Resources"].get(resource, missing) for n in ray.nodes() if n["Alive"]), default=missing)


def configure_checkpoint(job: JobConfig) -> None:
    """Turn on Ray Data checkpointing keyed by ``id`` (before the dataset is built).

    Ray filters rows whose ids were already written at read time and records ids as
    output files land, so a killed driver's rerun processes only what is missing.
    The checkpoint is kept after success: rerunning a finished job writes nothing.
    """
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    from hired_batch import sources

    ctx = DataContext.get_current()
    if not job.checkpoint:
        ctx.checkpoint_config = None
        return
    if is_hf_job(job):
        raise ValueError("--checkpoint needs Parquet input (local or s3://); export the HF dataset to Parquet first")
    fs, path = sources.pyarrow_fs(job.checkpoint, job.s3)
    ctx.checkpoint_config = CheckpointConfig(
        id_column=ROW_ID, checkpoint_path=path, override_filesystem=fs, delete_checkpoint_on_success=False)


def write_output(ds, job: JobConfig) -> None:
    """Execute the pipeline into Parquet files under ``job.output``."""
    from hired_batch import sources

    fs, path = sources.pyarrow_fs(job.output, job.s3)
    ds.write_parquet(path, filesystem=fs, max_rows_per_file=job.resources.rows_per_file)
