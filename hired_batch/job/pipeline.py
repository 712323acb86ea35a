"""``build_pipeline(job)``: read -> preprocess (CPU) -> generate (GPU actors) -> Parquet.

The stages' resource knobs come from ``resources.py``; configuration problems are
found by ``preflight.py`` before Ray runs anything; the output side (checkpoint,
Parquet write) is ``output.py``. This module does not parse flags (``options.py``)
and does not decode or generate (``stages.py``).
"""

from __future__ import annotations

from hired_batch.config import ColumnSpec, JobConfig
from hired_batch.job.preflight import check_columns, needed_columns, refuse_duplicates
from hired_batch.job.resources import READ_CPUS, generate_remote_args, preprocess_batch, with_cluster_gpus
from hired_batch.job.sources import ROW_ID, is_hf_job


def read_input(job: JobConfig):
    """Dataset of the needed columns plus a unique string ``id`` column.

    The CPU reservations are sized so that, on a 2-CPU machine, a read task, one
    preprocessing actor, one generation actor and Ray's checkpoint-filter actor (1 CPU)
    fit together: an oversubscribed actor pool would wait forever.
    """
    from hired_batch.job import sources

    c = job.columns
    needed = needed_columns(c)
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
    check_columns(needed, table.column_names, spec)
    if c.id_column in table.column_names:
        ids = table.column(c.id_column).cast(pa.string())
        refuse_duplicates(ids.to_pylist(), spec)
    else:
        ids = pa.array([f"row#{i}" for i in range(table.num_rows)], pa.string())
    table = table.select(needed).append_column(sources.ROW_ID, ids)
    return ray.data.from_arrow(table)


def build_pipeline(job: JobConfig):
    """The job as a lazy Ray Dataset of output rows (call ``write_output`` to run it)."""
    from dataclasses import replace

    from ray.data import ActorPoolStrategy

    from hired_batch.job.engine_health import start_log
    from hired_batch.job.stages import GenerateStage, PreprocessStage, VllmGenerateStage

    r = with_cluster_gpus(job.resources.check())
    if job.model.engine == "vllm" and not r.gpus_per_actor:  # a CPU cluster joined: known only now
        from hired_batch.engine.vllm.options import check_cpu_head_size

        check_cpu_head_size(job.model.path)
    ds = read_input(job)
    columns = replace(job.columns, id_column=ROW_ID)
    # 1) CPU: decode, validate, tokenize, anyres pixels (overlaps the GPU stage)
    ds = ds.map_batches(
        PreprocessStage, fn_constructor_args=(job.model.path, columns, job.limits, job.generation.system_prompt,
                                              job.model.engine),
        batch_size=preprocess_batch(r), batch_format="numpy", num_cpus=r.preprocess_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=r.preprocess_actors),
    )
    # 2) GPU actors: the model loads once per actor; large batches
    # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1:
    # a dead actor is restarted and its batches retried, which exactly-once relies on;
    # the failure log ends the job when an engine fails the same way again (engine_health).
    health = start_log()
    if job.model.engine == "vllm":
        return ds.map_batches(
            VllmGenerateStage, fn_constructor_args=(job.model, job.selection, job.generation, columns.keep_columns),
            fn_constructor_kwargs=dict(batch_size=r.batch_size, memory_limit=r.memory_limit,
                                       tensor_parallel_size=r.tensor_parallel_size, health=health),
            batch_size=_generate_batch(r), batch_format="numpy", **generate_remote_args(r),
            # several Ray batches in flight per actor feed its one engine (continuous batching)
            compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors,
                                      max_tasks_in_flight_per_actor=VLLM_BATCHES_IN_FLIGHT,
                                      max_concurrent_calls_per_actor=VLLM_BATCHES_IN_FLIGHT),
        )
    return ds.map_batches(
        GenerateStage, fn_constructor_args=(job.model, job.selection, job.generation, columns.keep_columns),
        fn_constructor_kwargs=dict(batch_size=r.batch_size, memory_limit=r.memory_limit, health=health),
        batch_size=_generate_batch(r), batch_format="numpy", **generate_remote_args(r),
        compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
    )


# --engine vllm: Ray batches each generation actor runs at once. With batch_size rows
# per Ray batch and the engine running up to batch_size sequences, the next batches'
# rows wait in vLLM's queue and fill each slot as soon as an answer ends.
VLLM_BATCHES_IN_FLIGHT = 4


def _generate_batch(r) -> int:
    """Rows per generation call: batch_size, or the grouping window with ``auto``."""
    return r.window if r.batch_size == "auto" else r.batch_size
