"""The job's output directory and its Ray Data checkpoint: keeping them apart from the
inputs and each other and writable (checked before Ray), refusing an output a run
would duplicate rows in, recording which checkpoint resumes it, ``--overwrite`` (only
files this job wrote), turning checkpointing on, the final Parquet write, and what a
failed write leaves (``write_failure``).

Ray Data (2.60) checkpoint layout this module relies on: see ``checkpoint_stems``.
"""

from __future__ import annotations

import re

from hired_batch.config import ConfigError, JobConfig
from hired_batch.job.image_folder import image_folder
from hired_batch.job.sources import ROW_ID, first_line, in_pool, is_hf_job

RUN_RECORD = "_hired_batch_checkpoint.txt"  # in --output: the --checkpoint of the run writing there
# ("_" names are skipped by Parquet dataset readers: pyarrow, pandas, Ray, Spark)

PENDING_SUFFIX = ".pending.parquet"  # Ray Data's name for a checkpoint file not yet committed


# Ray Data (2.60) names: DATASET_WRITEUUID_TASK-N.parquet for a data file, DATASET_WRITEUUID_TASK
# (.pending).parquet for its checkpoint file (DATASET: Ray's base-62 or counter id).
# ``--overwrite`` deletes only files named so, directly in --output / --checkpoint.
_RAY_STEM = r"[0-9A-Za-z]+_[0-9a-f]{32}_[0-9]{6}"
OUTPUT_FILE = re.compile(_RAY_STEM + r"-[0-9]+\.parquet")
CHECKPOINT_FILE = re.compile(_RAY_STEM + r"(\.pending)?\.parquet")

PROBE = "_hired_batch_write_probe"  # written and deleted at preflight to learn the job can write there


def _norm(url: str) -> str:
    """A location as a comparable string: local paths resolved (symlinks too), URLs
    without repeated or trailing slashes."""
    import os

    if "://" not in url:
        return os.path.realpath(url)
    scheme, rest = url.split("://", 1)
    return f"{scheme.lower()}://" + re.sub("/+", "/", rest).rstrip("/")


def _within(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies inside it (both ``_norm``ed)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _places(job: JobConfig) -> list[tuple[str, str]]:
    """(flag, location) of every directory the job writes and may delete files in."""
    return [("--output", job.output)] + ([("--checkpoint", job.checkpoint)] if job.checkpoint else [])


def check_places_apart(job: JobConfig) -> None:
    """Refuse an output or checkpoint that is, holds or lies inside an input, and a
    checkpoint that is or overlaps the output: the job writes there, ``--overwrite``
    deletes there, and the next run would read its own files back.

    Inputs are compared as given (a directory, a file, a glob) and, for Parquet input
    that is local or globbed, as the files they resolve to (symlinks resolved); local
    paths and s3:// URLs alike (normalized URLs compared as strings)."""
    from hired_batch.job import sources

    places = [(flag, url, _norm(url)) for flag, url in _places(job)]
    if job.checkpoint:
        (_, out, o), (_, ck, c) = places
        relation = (
            "is the --output directory"
            if o == c
            else "lies inside --output"
            if _within(c, o)
            else "holds --output"
            if _within(o, c)
            else None
        )
        if relation:
            raise ConfigError(
                f"--checkpoint {ck!r} {relation} {out!r}: Ray's checkpoint files would be read as "
                "output rows (and --overwrite would delete one with the other); give them separate "
                "directories"
            )
    specs = [s for s in job.inputs if not s.startswith("hf:")]
    for flag, url, loc in places:
        for spec in specs:
            src = _norm(spec)
            if _within(loc, src):
                what = "is" if loc == src else "is inside"
                raise ConfigError(
                    f"{flag} {url!r} {what} input {spec!r}; the job writes and deletes files there: "
                    "choose a directory apart from every input"
                )
            if _within(src, loc):
                raise ConfigError(
                    f"input {spec!r} lies inside {flag} {url!r}; the job writes and deletes files "
                    "there: choose a directory apart from every input"
                )
    if is_hf_job(job) or not any("://" not in s or any(c in s for c in "*?[") for s in specs):
        return  # on S3 a directory holds no links: the specs compared above are the whole story
    folder = image_folder(job)  # a folder of images: its image files, else the Parquet files
    found = folder[1] if folder else sources.list_parquet_files(list(specs), job.s3)
    files = [(f, _norm(f)) for f in found]
    for flag, url, loc in places:
        hit = next((f for f, n in files if _within(n, loc)), None)
        if hit:
            raise ConfigError(
                f"input file {hit} lies inside {flag} {url!r}; the job writes and deletes files "
                "there: choose a directory apart from every input"
            )


def check_writable(job: JobConfig) -> None:
    """Write and delete a probe file in the output and checkpoint directories, so a
    read-only, missing or forbidden location is refused before Ray starts. Local
    directories the probe had to create are removed again."""
    import uuid

    from hired_batch.engine.inputs import redact_url

    for flag, url in _places(job):
        fs, root = _fs_root(url, job)
        local = _is_local(fs)
        made = _missing_dirs(root) if local else []
        try:
            if local:
                fs.makedirs(root, exist_ok=True)
            probe = f"{root}/{PROBE}-{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - any failure means the job could not write there
            raise ConfigError(
                f"cannot write to {flag} {redact_url(url)}: {first_line(e)}; expected a directory "
                "this job may create files in"
            ) from None
        finally:
            for d in made:  # deepest first
                try:
                    fs.rmdir(d)
                except OSError:
                    break


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def _missing_dirs(path: str) -> list[str]:
    """The directories ``makedirs(path)`` would create, deepest first."""
    import os

    made = []
    while path and not os.path.lexists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return made


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
    pending = {n[: -len(PENDING_SUFFIX)] for n in names if n.endswith(PENDING_SUFFIX)}
    committed = {n[: -len(".parquet")] for n in names if not n.endswith(PENDING_SUFFIX)}
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
        check_overwrite_deletes_only_ours(job)
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
        raise ConfigError(
            f"{head} of a run with --checkpoint {recorded}: add --checkpoint {recorded} to resume it, "
            "or use a new directory, or --overwrite to start over"
        )
    raise ConfigError(
        f"{head} that no checkpoint accounts for, so that run cannot be resumed: "
        "use a new directory, or --overwrite to replace them"
    )


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
        whose = (
            f" (they belong to the run with --checkpoint {recorded})"
            if recorded and recorded != _absolute(job.checkpoint)
            else ""
        )
        raise ConfigError(
            f"output {job.output!r} holds {len(stray)} Parquet file(s) that checkpoint "
            f"{job.checkpoint!r} does not account for, e.g. {stray[0]}{whose}; resuming would write "
            "their rows twice: use a new output directory, or --overwrite to start over"
        )
    check_no_rows_lost(job, old, committed, pending)


def check_no_rows_lost(job: JobConfig, old: list[str], committed: set[str], pending: set[str]) -> None:
    """Every id a committed checkpoint file records must be in an output file (only the
    id columns are read): a lost ``STEM-1.parquet`` is caught even while ``STEM-0`` is
    there. Files of pending stems are skipped: the resume deletes and redoes them."""
    cfs, croot = _fs_root(job.checkpoint, job)
    ofs, _ = _fs_root(job.output, job)
    kept = [f for f in old if not any(f.rsplit("/", 1)[-1].startswith(s) for s in pending)]
    present = set().union(*_ids_of(ofs, kept, "output"))
    done = _ids_of(cfs, [f"{croot}/{s}.parquet" for s in sorted(committed)], "checkpoint")
    lost = sorted(set().union(*done) - present)
    if lost:
        raise ConfigError(
            f"checkpoint {job.checkpoint!r} records {len(lost)} row(s) as written that no file in "
            f"output {job.output!r} holds, e.g. id {lost[0]!r}; a resume would never write those "
            "rows: resume into the output that run wrote, or use a new --checkpoint directory"
        )


def _ids_of(fs, files: list[str], what: str) -> list[set]:
    """The id column of each of ``files`` (read in parallel: on S3 each is a round trip)."""
    import pyarrow.parquet as pq

    def ids(f):
        try:
            with fs.open(f, "rb") as fh:
                return set(pq.read_table(fh, columns=[ROW_ID]).column(0).cast("string").to_pylist())
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file, named in one line
            raise ConfigError(
                f"{what} file {f} cannot be read ({first_line(e)}); expected a Parquet file with an "
                f"{ROW_ID!r} column, as a run of this job writes"
            ) from None

    return in_pool(ids, files)


def remove_unreadable(job: JobConfig, before: set[str]) -> list[str]:
    """After a failed write (disk full): delete the output files this run left that
    pyarrow cannot read (no footer: the write was cut short), unless a committed
    checkpoint file accounts for them. Files present before the run are never touched.
    Returns the files removed."""
    import pyarrow.parquet as pq

    committed = checkpoint_stems(job, job.checkpoint)[0] if job.checkpoint else set()
    fs, _ = _fs_root(job.output, job)
    removed = []
    for f in existing_outputs(job):
        if f in before or any(f.rsplit("/", 1)[-1].startswith(s) for s in committed):
            continue
        try:
            with fs.open(f, "rb") as fh:
                pq.read_metadata(fh)
        except Exception:  # noqa: BLE001 - unreadable is what we look for
            fs.rm(f)
            removed.append(f)
    return removed


def _ours(job: JobConfig) -> tuple[list, list[str]]:
    """([(fsspec filesystem, file) a run of this job wrote], [other Parquet files]) in
    --output and --checkpoint: ours bear Ray Data's names (``OUTPUT_FILE``,
    ``CHECKPOINT_FILE``) directly inside."""
    ours, other = [], []
    for flag, url in _places(job):
        fs, root = _fs_root(url, job)
        pattern = OUTPUT_FILE if flag == "--output" else CHECKPOINT_FILE
        for f in fs.find(root) if fs.isdir(root) else []:
            parent, _, name = f.rpartition("/")
            if parent.rstrip("/") == root and pattern.fullmatch(name):
                ours.append((fs, f))
            elif name.endswith(".parquet"):
                other.append(f)
    return ours, other


def check_overwrite_deletes_only_ours(job: JobConfig) -> None:
    """``--overwrite`` deletes only what a run of this job wrote; other Parquet files
    there would be read with the new rows (output) or as done ids (checkpoint)."""
    _, other = _ours(job)
    if other:
        raise ConfigError(
            f"--overwrite deletes only files this job writes, but {len(other)} other Parquet file(s) "
            f"are in --output/--checkpoint, e.g. {other[0]}: move them away or choose a new directory"
        )


def clear_output(job: JobConfig) -> None:
    """``--overwrite`` starts over: delete the Parquet files and run record a run of
    this job left in the output and, with ``--checkpoint``, the checkpoint's files
    (else their ids would be skipped). Never an input: ``check_places_apart`` again
    first, for callers that skipped preflight."""
    if not job.overwrite:
        return
    check_places_apart(job)
    check_overwrite_deletes_only_ours(job)
    fs, root = _fs_root(job.output, job)
    record = [(fs, f"{root}/{RUN_RECORD}")] if fs.exists(f"{root}/{RUN_RECORD}") else []
    for ffs, f in _ours(job)[0] + record:
        ffs.rm(f)


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
        id_column=ROW_ID, checkpoint_path=path, override_filesystem=fs, delete_checkpoint_on_success=False
    )


class OutputWriteError(RuntimeError):
    """The job could not write its output or checkpoint (disk full, permissions, a
    store refusing writes): ``str()`` is one line naming the location and the cause."""


def write_failure(job: JobConfig, e: OSError, before: set[str]) -> OutputWriteError | None:
    """``e`` raised by ``write_output`` as an ``OutputWriteError`` when Ray's write task
    raised it (after removing the unreadable files it left, ``remove_unreadable``);
    None for an OSError from elsewhere (reading the input), which keeps its traceback."""
    if not _is_write_error(e):
        return None
    cause = getattr(e, "cause", None) or e
    removed = remove_unreadable(job, before)
    where = f"--output {job.output}" + (f" (or its --checkpoint {job.checkpoint})" if job.checkpoint else "")
    gone = f"; removed {len(removed)} unreadable file(s) the failed write left there" if removed else ""
    return OutputWriteError(f"writing to {where} failed: {_os_reason(cause)}{gone}")


def _is_write_error(e: BaseException) -> bool:
    """An OSError Ray's write task raised (its header names the task: ``ray::Write()``)."""
    return isinstance(e, OSError) and "ray::Write" in str(getattr(e, "proctitle", "")) + str(e).split("\n", 1)[0]


# Ray Data's loggers that print a failed task's traceback in the driver (twice, ~200 lines)
RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


def _drop_write_tracebacks(record) -> bool:
    """Logging filter: False (drop) for Ray Data's records about a failed write (its
    tracebacks, and "please open an issue" logged while handling it), which
    ``write_failure`` turns into one line; any other error keeps its traceback."""
    import sys

    return not _is_write_error(record.exc_info[1] if record.exc_info else sys.exc_info()[1])


def _os_reason(e: BaseException) -> str:
    """``OSError: [Errno 28] ... No space left on device``, without the retry advice Ray
    Data puts in the error's filename."""
    if isinstance(e, OSError) and e.errno and e.strerror:
        return f"{type(e).__name__}: [Errno {e.errno}] {e.strerror}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def write_output(ds, job: JobConfig) -> None:
    """Execute the pipeline into Parquet files under ``job.output``."""
    import logging

    from hired_batch.job import sources

    fs, path = sources.pyarrow_fs(job.output, job.s3)
    loggers = [logging.getLogger(name) for name in RAY_DATA_ERROR_LOGGERS]
    for lg in loggers:
        lg.addFilter(_drop_write_tracebacks)
    try:
        ds.write_parquet(path, filesystem=fs, max_rows_per_file=job.resources.rows_per_file)
    finally:
        for lg in loggers:
            lg.removeFilter(_drop_write_tracebacks)
