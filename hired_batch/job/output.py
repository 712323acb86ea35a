"""The job's output directory and its Ray Data checkpoint: refusing an output a run
would duplicate rows in, recording which checkpoint resumes it, ``--overwrite``,
turning checkpointing on, and the final Parquet write.

Ray Data (2.60) checkpoint layout this module relies on: see ``checkpoint_stems``.
"""

from __future__ import annotations

from hired_batch.config import ConfigError, JobConfig
from hired_batch.job.sources import ROW_ID, is_hf_job


RUN_RECORD = "_hired_batch_checkpoint.txt"  # in --output: the --checkpoint of the run writing there
# ("_" names are skipped by Parquet dataset readers: pyarrow, pandas, Ray, Spark)

PENDING_SUFFIX = ".pending.parquet"  # Ray Data's name for a checkpoint file not yet committed


def check_output_not_inside_input(inputs, output: str) -> None:
    """Writing into the input tree would re-read our own answers next time."""
    import os

    out = os.path.abspath(output) if "://" not in output else output.rstrip("/")
    for spec in inputs:
        src = os.path.abspath(spec) if "://" not in spec and not spec.startswith("hf:") else spec.rstrip("/")
        if out == src or out.startswith(src.rstrip("/") + "/"):
            raise ConfigError(f"output {output!r} is inside input {spec!r}; choose a separate directory")


def check_checkpoint_input(job: JobConfig) -> None:
    """Ray Data checkpointing filters rows at read time, which our HF reader does not do."""
    if job.checkpoint and is_hf_job(job):
        raise ConfigError("--checkpoint needs Parquet input (local or s3://); export the HF dataset to Parquet first")


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
