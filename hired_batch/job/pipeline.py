"""``build_pipeline(job)``: read -> preprocess (CPU) -> generate (GPU actors) -> Parquet.

The stages' resource knobs come from ``resources.py``; configuration problems are
found by ``preflight.py`` before Ray runs anything; the output side (checkpoint,
Parquet write) is ``output.py``. This module does not parse flags (``options.py``)
and does not decode or generate (``stages.py``).
"""

from __future__ import annotations

from hired_batch.config import ColumnSpec, JobConfig
from hired_batch.job.image_folder import image_folder, read_image_folder
from hired_batch.job.preflight import (
    check_columns,
    check_question_type,
    needed_columns,
    refuse_duplicates,
    refuse_null_ids,
)
from hired_batch.job.resources import READ_CPUS, generate_remote_args, preprocess_batch, with_cluster_gpus
from hired_batch.job.sources import ROW_ID, is_hf_job


def read_input(job: JobConfig):
    """(Dataset of the needed columns plus a unique string ``id`` column, the Arrow schema
    of the kept columns: the types the output gives them).

    The CPU reservations are sized so that, on a 2-CPU machine, a read task, one
    preprocessing actor, one generation actor and Ray's checkpoint-filter actor (1 CPU)
    fit together: an oversubscribed actor pool would wait forever.
    """
    from hired_batch.job import sources

    c = job.columns
    needed = needed_columns(c)
    if is_hf_job(job):
        return _read_hf(job.inputs[0], c, needed)
    folder = image_folder(job)
    if folder:  # rows: the image's path and its id; no kept columns (preflight refused them)
        return read_image_folder(*folder, c, num_cpus=READ_CPUS), None
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    schemas = list(sources.parquet_schemas(files, job.s3).values())  # preflight checked every file's columns
    id_col = c.id_column if c.id_column in schemas[0].names else None
    ds = sources.read_parquet_rows(
        files,
        needed,
        id_col,
        job.s3,
        num_cpus=READ_CPUS,
        report_to=job.output,
        root=sources.id_root(list(job.inputs), files),
    )
    return ds, kept_schema(schemas, c.keep_columns)


def kept_schema(schemas: list, keep_columns: tuple):
    """The kept columns' Arrow types over every input file's schema: widths widened
    (int32 + int64 -> int64), all-null files taking the others' type, as Ray Data joins them."""
    import pyarrow as pa

    try:
        unified = pa.unify_schemas(
            [pa.schema([s.field(k) for k in keep_columns]) for s in schemas], promote_options="permissive"
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None  # types Arrow cannot join (preflight let them pass): the stages infer them, as before
    return pa.schema([unified.field(k) for k in keep_columns])


def _read_hf(spec: str, c: ColumnSpec, needed: list[str]):
    import pyarrow as pa
    import ray

    from hired_batch.job import sources

    table = sources.load_hf_table(spec)
    check_columns(needed, table.column_names, spec)
    check_question_type({spec: table.schema}, c)
    if c.id_column in table.column_names:
        ids = table.column(c.id_column).cast(pa.string())
        refuse_null_ids(ids.to_pylist(), spec, c)
        refuse_duplicates(ids.to_pylist(), spec, c)
    else:
        ids = pa.array([f"row#{i}" for i in range(table.num_rows)], pa.string())
    table = table.select(needed).append_column(sources.ROW_ID, ids)
    return ray.data.from_arrow(table), kept_schema([table.schema], c.keep_columns)


def build_pipeline(job: JobConfig):
    """The job as a lazy Ray Dataset of output rows (call ``write_output`` to run it)."""
    from dataclasses import replace

    from ray.data import ActorPoolStrategy

    from hired_batch.engine import backends
    from hired_batch.job.engine_health import start_log
    from hired_batch.job.stages import GenerateStage, PreprocessStage, pack_kept

    r = with_cluster_gpus(job.resources.check())
    backend = backends.get(job.model.engine)
    if backend.check_on_cpu and not r.gpus_per_actor:  # a CPU cluster joined: known only now
        backend.check_on_cpu(job.model.path)
    ds, kept = read_input(job)
    columns = replace(job.columns, id_column=ROW_ID, question_list=question_list_of(job))
    if kept:  # kept columns travel pickled, so numpy batches cannot change them (``pack_kept``)
        ds = ds.map_batches(
            pack_kept, fn_args=(tuple(kept.names),), batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS
        )
    kept = kept if kept is not None else columns.keep_columns  # a schema: rebuilt with its types; names: inferred
    # 1) CPU: decode, validate, tokenize, anyres pixels (overlaps the GPU stage)
    ds = ds.map_batches(
        PreprocessStage,
        fn_constructor_args=(job.model.path, columns, job.limits, job.generation.system_prompt, job.model.engine),
        batch_size=preprocess_batch(r),
        batch_format="numpy",
        num_cpus=r.preprocess_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=r.preprocess_actors),
    )
    # 2) GPU actors: the model loads once per actor; large batches
    # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1:
    # a dead actor is restarted and its batches retried, which exactly-once relies on;
    # the failure log ends the job when an engine fails the same way again (engine_health).
    health = start_log()
    # several Ray batches in flight per actor feed an engine that batches continuously (vLLM)
    in_flight = backend.batches_in_flight  # None: Ray Data's defaults (one call at a time)
    return ds.map_batches(
        GenerateStage,
        fn_constructor_args=(job.model, job.selection, job.generation, kept),
        fn_constructor_kwargs=dict(
            batch_size=r.batch_size,
            memory_limit=r.memory_limit,
            tensor_parallel_size=r.tensor_parallel_size,
            health=health,
            asks=columns.ask,
            question_list=columns.question_list,
        ),
        batch_size=_generate_batch(r),
        batch_format="numpy",
        **generate_remote_args(r),
        compute=ActorPoolStrategy(
            min_size=r.min_actors,
            max_size=r.max_actors,
            max_tasks_in_flight_per_actor=in_flight,
            max_concurrent_calls_per_actor=in_flight,
        ),
    )


def question_list_of(job: JobConfig) -> bool:
    """Whether the job's question column is list<string> (each row asks its own questions, job/ask.py)."""
    from hired_batch.job import sources
    from hired_batch.job.ask import is_question_list

    q = job.columns.question_column
    if q is None or is_hf_job(job):
        return False
    schemas = sources.parquet_schemas(sources.list_parquet_files(list(job.inputs), job.s3), job.s3)
    return any(q in s.names and is_question_list(s.field(q).type) for s in schemas.values())


def _generate_batch(r) -> int:
    """Rows per generation call: batch_size, or the grouping window with ``auto``."""
    return r.window if r.batch_size == "auto" else r.batch_size
