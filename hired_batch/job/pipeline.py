"""``build_pipeline(job)``: read -> preprocess (CPU) -> generate (GPU actors) -> Parquet.

Every resource knob (batch size, actor counts, GPUs, CPUs, rows per file) is set here
and nowhere else. Configuration problems are found by ``check_job`` before Ray runs
anything.

This module does not parse flags (``runner.py``) and does not decode or generate
(``stages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hired_batch.config import ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.inputs import DecodeLimits
from hired_batch.job.sources import ROW_ID, S3Options
from hired_batch.job.stages import ColumnSpec

# CPUs each read task reserves: reading is I/O bound, and with 0.25 a read task, a
# preprocessing and a generation actor and Ray's checkpoint filter fit on 2 CPUs
# (``read_input``); a setting, not a knob: nothing measured says another value helps.
READ_CPUS = 0.25


@dataclass(frozen=True)
class Resources:
    """How much of the cluster the job uses."""

    batch_size: int | str = 8  # items per generate call, or "auto": the most that fit memory_limit
    window: int = 64  # with "auto": rows per Ray batch, grouped by planned prompt length inside; caps the auto batch
    memory_limit: str | None = None  # with "auto": bytes a batch may use ("24GB"); None = free device memory
    min_actors: int = 1  # GPU actors at least (autoscaling lower bound)
    max_actors: int = 1  # GPU actors at most
    gpus_per_actor: float = 1.0  # GPUs each generation actor reserves (0 on CPU-only clusters)
    generate_cpus: float = 0.25  # CPUs each generation actor reserves (it mostly waits on its GPU)
    preprocess_cpus: float = 0.5  # CPUs per preprocessing actor
    preprocess_actors: int = 1  # preprocessing actors (they overlap GPU work)
    generate_memory: str | None = None  # host memory each generation actor reserves in Ray ("16GB"); None = none
    rows_per_file: int = 10_000  # output rows per Parquet file at most

    def check(self) -> "Resources":
        """Raise ConfigError on an out-of-range field; return self."""
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be >= 1 or 'auto', got {self.batch_size!r}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if not (1 <= self.min_actors <= self.max_actors):
            raise ConfigError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.gpus_per_actor > 1:
            # the engine puts the whole model on one device; a second GPU would sit idle
            raise ConfigError(f"--gpus-per-actor {self.gpus_per_actor:g}: each generation actor runs the model on "
                             "one GPU; use --num-actors N to use N GPUs (values up to 1 share a GPU)")
        if self.gpus_per_actor < 0 or self.preprocess_cpus <= 0 or self.preprocess_actors < 1:
            raise ConfigError("gpus_per_actor must be >= 0, preprocess_cpus > 0, preprocess_actors >= 1")
        if self.generate_cpus < 0:
            raise ConfigError(f"generate_cpus must be >= 0, got {self.generate_cpus}")
        from hired_batch.engine.batching import parse_bytes

        for size in (self.generate_memory, self.memory_limit):
            if size is not None:
                parse_bytes(size)  # raises ConfigError naming the expected form
        if self.rows_per_file < 1:
            raise ConfigError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
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
            raise ConfigError(f"output {output!r} is inside input {spec!r}; choose a separate directory")


def is_hf_job(job: JobConfig) -> bool:
    """True when the job reads one Hugging Face dataset rather than Parquet."""
    from hired_batch.job import sources

    return len(job.inputs) == 1 and sources.is_hf_input(job.inputs[0])


def check_checkpoint_input(job: JobConfig) -> None:
    """Ray Data checkpointing filters rows at read time, which our HF reader does not do."""
    if job.checkpoint and is_hf_job(job):
        raise ConfigError("--checkpoint needs Parquet input (local or s3://); export the HF dataset to Parquet first")


def preflight(job: JobConfig) -> None:
    """Checks that need no Ray: output location, prompt template, every input file's
    columns and their types, unique ids."""
    from hired_batch.job import sources

    for url in (*job.inputs, job.output, job.checkpoint or ""):
        sources.check_no_inline_credentials(url)
    check_output_not_inside_input(job.inputs, job.output)
    check_output_is_fresh(job)
    job.columns.check()  # the --prompt template, for callers that built the JobConfig themselves
    check_checkpoint_input(job)
    if is_hf_job(job):
        return  # columns are checked once the dataset is loaded
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    schemas = sources.parquet_schemas(files, job.s3)  # footers only, read once for every check below
    check_input_schemas(schemas, job.columns)
    if ROW_ID in _needed_columns(job.columns):
        raise ConfigError(f"input column {ROW_ID!r} cannot be read as data: the output's id column has that name")
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
        raise ConfigError(f"id column {c.id_column!r} is in {has_id[0]} but not in {lacking}; every input file "
                         "needs it, or none (then ids are generated as FILE#ROW)")


def _check_one_kind(name: str, types: dict) -> None:
    """``types``: {file: Arrow type of column ``name``}; all-null columns fit any kind."""
    import pyarrow as pa

    from hired_batch.job.sources import type_kind

    typed = {f: t for f, t in types.items() if not pa.types.is_null(t)}
    first = next(iter(typed), None)
    for f, t in typed.items():
        if type_kind(t) != type_kind(typed[first]):
            raise ConfigError(f"column {name!r} is {typed[first]} in {first} but {t} in {f}; a column the job reads "
                             "must have one kind of type in every input file (only widths may differ, e.g. "
                             "string/large_string, int32/int64)")


RUN_RECORD = "_hired_batch_checkpoint.txt"  # in --output: the --checkpoint of the run writing there
# ("_" names are skipped by Parquet dataset readers: pyarrow, pandas, Ray, Spark)
PENDING_SUFFIX = ".pending.parquet"  # Ray Data's name for a checkpoint file not yet committed


def _fs_root(url: str, job: JobConfig):
    """(fsspec filesystem, path without scheme) of a local or s3:// directory."""
    import fsspec

    from hired_batch.job import sources

    fs, _, (root,) = fsspec.get_fs_token_paths(url, storage_options=sources.fsspec_options(job.s3))
    return fs, root.rstrip("/")


def existing_outputs(job: JobConfig) -> list[str]:
    """Parquet files already under the output directory."""
    fs, root = _fs_root(job.output, job)
    return [f for f in fs.find(root) if f.endswith(".parquet")] if fs.isdir(root) else []


def checkpoint_stems(job: JobConfig, checkpoint: str) -> tuple[set[str], set[str]]:
    """(committed, pending) checkpoint file stems under ``checkpoint``.

    Ray Data (2.60) names each write task's checkpoint file after the task's data file
    name without its extension; the task's data files are that stem plus ``-N.parquet``.
    A committed ``STEM.parquet`` lists the ids those files hold; a ``STEM.pending.parquet``
    was written before its data and never committed, so the resume deletes the data
    files starting with STEM and redoes their rows.
    """
    fs, root = _fs_root(checkpoint, job)
    names = [f.rsplit("/", 1)[-1] for f in fs.find(root) if f.endswith(".parquet")] if fs.isdir(root) else []
    pending = {n[:-len(PENDING_SUFFIX)] for n in names if n.endswith(PENDING_SUFFIX)}
    committed = {n[:-len(".parquet")] for n in names if not n.endswith(PENDING_SUFFIX)}
    return committed, pending


def _unaccounted(files: list[str], stems: set[str]) -> list[str]:
    """Names of ``files`` no checkpoint stem accounts for (Ray's prefix rule)."""
    names = [f.rsplit("/", 1)[-1] for f in files]
    return [n for n in names if not any(n.startswith(s) for s in stems)]


def recorded_checkpoint(job: JobConfig) -> str | None:
    """The --checkpoint an earlier run recorded in the output directory, if any."""
    fs, root = _fs_root(job.output, job)
    path = f"{root}/{RUN_RECORD}"
    if not fs.exists(path):
        return None
    return fs.cat_file(path).decode().strip() or None


def record_checkpoint(job: JobConfig) -> None:
    """Note in the output directory which checkpoint resumes it (or that none does),
    so a rerun without --checkpoint can say how to resume instead of guessing."""
    fs, root = _fs_root(job.output, job)
    path = f"{root}/{RUN_RECORD}"
    if job.checkpoint:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(path, (_absolute(job.checkpoint) + "\n").encode())
    elif fs.exists(path):
        fs.rm(path)


def _absolute(url: str) -> str:
    import os

    return url if "://" in url else os.path.abspath(url)


def check_output_is_fresh(job: JobConfig) -> None:
    """Parquet writes append: a rerun into a used directory would duplicate rows.

    Allowed: an empty/new directory; ``--overwrite`` (old files are deleted first, by
    ``clear_output``); ``--checkpoint`` when that checkpoint accounts for every file in
    the output and every file it records is there (``check_resume_is_exact``).
    """
    if job.overwrite:
        return
    if job.checkpoint:
        check_resume_is_exact(job)
        return
    old = existing_outputs(job)
    if not old:
        return
    head = f"output {job.output!r} already holds {len(old)} Parquet file(s)"
    recorded = recorded_checkpoint(job)
    if recorded and not _unaccounted(old, set().union(*checkpoint_stems(job, recorded))):
        raise ConfigError(f"{head} of a run with --checkpoint {recorded}: add --checkpoint {recorded} to resume it, "
                         "or use a new directory, or --overwrite to start over")
    raise ConfigError(f"{head} that no checkpoint accounts for, so that run cannot be resumed: "
                     "use a new directory, or --overwrite to replace them")


def check_resume_is_exact(job: JobConfig) -> None:
    """A resume may only add the rows its checkpoint says are missing.

    Refuses output files the checkpoint does not account for (their rows would be
    written again) and committed checkpoint files whose data files are gone (their
    rows would be skipped and never written).
    """
    old = existing_outputs(job)
    committed, pending = checkpoint_stems(job, job.checkpoint)
    stray = _unaccounted(old, committed | pending)
    if stray:
        recorded = recorded_checkpoint(job)
        whose = (f" (they belong to the run with --checkpoint {recorded})"
                 if recorded and recorded != _absolute(job.checkpoint) else "")
        raise ConfigError(f"output {job.output!r} holds {len(stray)} Parquet file(s) that checkpoint "
                         f"{job.checkpoint!r} does not account for, e.g. {stray[0]}{whose}; resuming would write "
                         "their rows twice: use a new output directory, or --overwrite to start over")
    names = [f.rsplit("/", 1)[-1] for f in old]
    lost = sorted(s for s in committed if not any(n.startswith(s) for n in names))
    if lost:
        raise ConfigError(f"checkpoint {job.checkpoint!r} records rows written to {len(lost)} file(s) that are not "
                         f"in output {job.output!r}, e.g. {lost[0]}-*.parquet; a resume would never write those "
                         "rows: resume into the output that run wrote, or use a new --checkpoint directory")


def clear_output(job: JobConfig) -> None:
    """``--overwrite`` starts over: delete the output's Parquet files and, with
    ``--checkpoint``, the checkpoint's files (else their ids would be skipped)."""
    if not job.overwrite:
        return
    fs, root = _fs_root(job.output, job)
    for f in existing_outputs(job):
        fs.rm(f)
    if job.checkpoint:
        cfs, croot = _fs_root(job.checkpoint, job)
        for f in (cfs.find(croot) if cfs.isdir(croot) else []):
            if f.endswith(".parquet"):
                cfs.rm(f)


def _needed_columns(c: ColumnSpec) -> list[str]:
    cols = [c.image_column] + ([c.question_column] if c.question_column else [])
    return list(dict.fromkeys(cols + list(c.prompt_columns) + list(c.keep_columns)))


def read_input(job: JobConfig):
    """Dataset of the needed columns plus a unique string ``id`` column.

    The CPU reservations are sized so that, on a 2-CPU machine, a read task, one
    preprocessing actor, one generation actor and Ray's checkpoint-filter actor (1 CPU)
    fit together: an oversubscribed actor pool would wait forever.
    """
    from hired_batch.job import sources

    c = job.columns
    needed = _needed_columns(c)
    if is_hf_job(job):
        return _read_hf(job.inputs[0], c, needed)
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    names = sources.parquet_schema_names(files[0], job.s3)  # preflight checked every file's columns
    id_col = c.id_column if c.id_column in names else None
    return sources.read_parquet_rows(files, needed, id_col, job.s3, num_cpus=READ_CPUS)


def _read_hf(spec: str, c: ColumnSpec, needed: list[str]):
    import pyarrow as pa
    import ray

    from hired_batch.job import sources

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
        raise ConfigError(f"{len(dupes)} duplicate id(s) in {where}, e.g. {dupes[:3]}; ids must be unique "
                         "(drop --id-column to use generated file#row ids)")


def check_unique_ids(schemas: dict, job: JobConfig) -> None:
    """Refuse duplicate ids across the Parquet files (reads only the id column, as text).

    ``schemas``: {file: Arrow schema} of every input file, as ``preflight`` read them;
    ``check_input_schemas`` has made sure the id column is in all of them or in none.
    """
    import pyarrow.parquet as pq

    from hired_batch.job import sources

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
        raise ConfigError(f"column(s) {missing} not found in {where}; available columns: {sorted(names)}")


def build_pipeline(job: JobConfig):
    """The job as a lazy Ray Dataset of output rows (call ``write_output`` to run it)."""
    from dataclasses import replace

    from ray.data import ActorPoolStrategy

    from hired_batch.job.stages import GenerateStage, PreprocessStage

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
        from hired_batch.engine.batching import parse_bytes

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
        raise ConfigError(f"--generate-memory {want / 1e9:.1f} GB is more than any node can reserve "
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

    from hired_batch.job import sources

    ctx = DataContext.get_current()
    if not job.checkpoint:
        ctx.checkpoint_config = None
        return
    check_checkpoint_input(job)
    fs, path = sources.pyarrow_fs(job.checkpoint, job.s3)
    ctx.checkpoint_config = CheckpointConfig(
        id_column=ROW_ID, checkpoint_path=path, override_filesystem=fs, delete_checkpoint_on_success=False)


def write_output(ds, job: JobConfig) -> None:
    """Execute the pipeline into Parquet files under ``job.output``."""
    from hired_batch.job import sources

    fs, path = sources.pyarrow_fs(job.output, job.s3)
    ds.write_parquet(path, filesystem=fs, max_rows_per_file=job.resources.rows_per_file)
