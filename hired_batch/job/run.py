"""``run_job(job)``: the whole job from Python, as ``hired-batch run``, the demo and the
bench's job mode run it: checks before Ray, Ray (joined or embedded), the pipeline,
then the output read back into a ``JobSummary``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from hired_batch.config import ConfigError, JobConfig


@dataclass(frozen=True)
class JobSummary:
    """What a finished run left in its output directory (listed afresh), and this run's share."""

    rows: int  # rows in the whole output, this run's and earlier (resumed) runs'
    ids: int  # distinct ids among them (== rows when every row is there exactly once)
    ok: int  # rows with an answer
    failed: int  # rows whose `error` is set
    processed: int  # rows this run wrote
    actors: int  # generation actors that wrote them (distinct `worker` host:pid; a restarted actor counts again)
    seconds: float  # wall time of this run's pipeline, s (checks and Ray start excluded)
    items_per_s: float  # processed / seconds
    mean_visual_tokens_kept: float  # over the ok rows
    output: str  # the output directory
    top_error: str | None = None  # the most common `error` in the output (None: no failed row)
    top_error_rows: int = 0  # rows with that error
    unreadable: tuple = ()  # input row groups this run could not decode (``sources.unreadable_records``)
    # mean bytes an ok row brought through Ray's object store from preprocessing to generation
    # (the output's ``handoff_bytes``, ``engine.handoff.item_bytes``); 0: not recorded
    handoff_bytes_per_item: float = 0.0

    @property
    def lost(self) -> int:
        """Input rows this run could not read (their row groups failed to decode), so not in the output."""
        return sum(r["rows"] for r in self.unreadable)

    def format(self) -> str:
        """The summary ``hired-batch run`` prints."""
        lost = f", lost {self.lost} in unreadable input" if self.lost else ""
        return (
            f"rows: {self.rows} (ok {self.ok}, failed {self.failed}{lost})  |  "
            f"this run: {self.processed} rows by {self.actors} generation actor(s), "
            f"{self.items_per_s:.2f} items/s over {self.seconds:.1f} s  |  "
            f"mean visual tokens kept {self.mean_visual_tokens_kept:.1f}"
            f"{self._handoff_text()}\n"
            f"output: {self.output}"
        )

    def _handoff_text(self) -> str:
        b = self.handoff_bytes_per_item
        return f"  |  object store {b / 1e6:.3f} MB per item (preprocessing -> generation)" if b else ""

    @property
    def duplicates_error(self) -> str | None:
        """The line to print when the output holds some id more than once (else None)."""
        if self.rows == self.ids:
            return None
        return (
            f"output {self.output} holds {self.rows} rows but only {self.ids} distinct ids: "
            f"{self.rows - self.ids} row(s) are duplicates; the output is not exactly once"
        )

    def failed_error(self, max_failed_fraction: float) -> str | None:
        """The line to print when every row failed, or more than ``max_failed_fraction`` of
        them (``FailurePolicy``), with the most common error; else None."""
        if not self.failed or (self.failed < self.rows and self.failed / self.rows <= max_failed_fraction):
            return None
        share = (
            "every row failed"
            if self.failed == self.rows
            else f"{self.failed} of {self.rows} rows failed, more than --max-failed-fraction {max_failed_fraction:g}"
        )
        return f"{share}; most common error ({self.top_error_rows} row(s)): {(self.top_error or '')[:300]}"

    def unreadable_error(self, skipped: bool) -> str | None:
        """The line naming the input row groups that could not be decoded (else None);
        ``skipped``: ``--skip-unreadable`` was given, so their rows count as lost."""
        if not self.unreadable:
            return None
        by_file: dict = {}
        for r in self.unreadable:
            by_file.setdefault(r["file"], []).append(r)
        where = "; ".join(
            f"{f} row group(s) {', '.join(str(r['row_group']) for r in rs)} ({rs[0]['error']})"
            for f, rs in by_file.items()
        )
        if skipped:
            return (
                f"{self.lost} input row(s) could not be read and were skipped (--skip-unreadable): {where}; "
                "every other row is written"
            )
        return (
            f"{self.lost} input row(s) could not be read: {where}; every other row is written: fix or remove the file"
        )


def run_job(
    job: JobConfig, *, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None
) -> JobSummary:
    """Check ``job``, start or join Ray, run it, and summarize its output.

    Everything checkable without Ray is checked first (``check_job``: raises ConfigError).
    Ray: the running one if this process has initialized it; else ``address`` or
    RAY_ADDRESS; else an embedded local Ray with ``num_cpus``/``num_gpus`` (None: Ray's
    own count). Generation actors get a GPU each when the cluster has GPUs, unless
    ``job.resources.gpus_per_actor`` says otherwise.
    """
    check_job(job)
    init_ray(address, num_cpus, num_gpus)
    return execute(job)


def check_job(job: JobConfig) -> None:
    """Every check that needs no Ray: the inputs and output (``preflight``), the model."""
    from hired_batch.job.preflight import (
        check_budget_tokens,
        check_constraints,
        check_model,
        check_system_prompt,
        preflight,
    )
    from hired_batch.job.sources import check_hf_input, is_hf_job

    preflight(job)
    check_model(job.model.path)
    check_budget_tokens(job.model.path, job.selection)
    check_system_prompt(job.model.path, job.generation.system_prompt)
    check_constraints(job)
    if is_hf_job(job):
        check_hf_input(job.inputs[0])


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join ``address`` or RAY_ADDRESS, else start an embedded Ray (unless this process
    already has one); True if the cluster has GPUs."""
    import ray

    given = address
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        try:
            with _caller_sigterm_kept():
                if address:
                    ray.init(address=address)
                else:
                    # address="local": a fresh embedded Ray even when a `ray start` cluster
                    # runs on this machine (joining one needs --address or RAY_ADDRESS)
                    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
        except Exception as e:  # noqa: BLE001 - whatever ray.init raises, the user gets one line
            raise ray_start_error(e, address, "--address" if given else "RAY_ADDRESS") from e
    return ray.cluster_resources().get("GPU", 0) > 0


def ray_start_error(e: Exception, address: str | None, source: str) -> ConfigError:
    """One line for a ``ray.init`` that failed: what failed, Ray's own first line, and what
    to check. Not a bug of ours but of the machine or the address, hence a ConfigError
    (the CLI prints it and exits 2) rather than Ray's traceback."""
    import tempfile

    import ray

    try:
        ray.shutdown()  # a half-started embedded Ray: its processes go now, not at exit
    except Exception:  # noqa: BLE001 - the failure being reported matters more
        pass
    cause = (str(e).strip().splitlines() or [""])[0][:200] or type(e).__name__
    if address:
        return ConfigError(
            f"could not join the Ray cluster at {address} (from {source}): {type(e).__name__}: "
            f"{cause}; check that the cluster runs and is reachable from here, and that it runs "
            f"Ray {ray.__version__} as this Python does (unset {source} to run on an embedded Ray)"
        )
    temp = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return ConfigError(
        f"the embedded Ray did not start: {type(e).__name__}: {cause}; check the free space "
        f"in {temp} (Ray's session files; RAY_TMPDIR moves them), that no stale Ray processes "
        f"of another version run on this machine, and the log in {temp}/ray/session_latest/logs"
    )


@contextmanager
def _caller_sigterm_kept():
    """``ray.init`` replaces the process's SIGTERM handler (with ``sys.exit``, then the core
    worker's, which aborts: exit 134); a Python handler the caller installed (the CLI's,
    ``runner.sigterm_as_interrupt``) is put back, so SIGTERM stops the job as the caller
    meant. With no Python handler before, Ray's stay."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def execute(job: JobConfig) -> JobSummary:
    """Run the pipeline on the Ray this process has joined, then read the output back."""
    from hired_batch.job.id_check import check_large_input_ids
    from hired_batch.job.output import (
        clear_output,
        configure_checkpoint,
        existing_outputs,
        record_checkpoint,
        write_failure,
        write_output,
    )
    from hired_batch.job.pipeline import build_pipeline
    from hired_batch.job.sources import clear_unreadable

    check_large_input_ids(job)  # a large input's ids, by Ray tasks: before anything is deleted or written
    t0 = time.perf_counter()
    configure_checkpoint(job)
    clear_output(job)
    clear_unreadable(job.output, job.s3)  # a rerun reports only the row groups it could not read
    record_checkpoint(job)
    before = set(existing_outputs(job))  # a resumed run's earlier files
    try:
        write_output(build_pipeline(job), job)
        return summarize(job, time.perf_counter() - t0, before)
    except FileNotFoundError as e:
        # not a user mistake once the job runs: a file vanished under us (the CLI would
        # otherwise report it as a bad path and exit 2)
        raise RuntimeError(f"a file went missing while the job ran: {e}") from e
    except OSError as e:  # disk full, read-only, refused: one line, no unreadable file left (OutputWriteError)
        failure = write_failure(job, e, before)
        if failure is None:
            raise
        raise failure from None
    except Exception as e:
        from hired_batch.job.engine_health import engine_failure

        failed = engine_failure(e)  # an engine that failed the same way twice: one line, not Ray's traceback
        if failed is None:
            raise
        raise failed from None


def summarize(job: JobConfig, seconds: float, earlier_files=frozenset()) -> JobSummary:
    """The output directory as it is now; ``earlier_files`` were there before this run."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from hired_batch.job.sources import pyarrow_fs, unreadable_records

    fs, path = pyarrow_fs(job.output, job.s3)
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    read = ["id", "error", "n_visual_tokens_kept"] + (["handoff_bytes"] if "handoff_bytes" in ds.schema.names else [])
    if ds.files:
        t = ds.to_table(columns=read)
    else:  # nothing written: every input row group this run read was unreadable
        from hired_batch.job.stages import OUTPUT_FIELDS

        t = pa.schema({k: OUTPUT_FIELDS[k] for k in read}).empty_table()
    earlier = {e.split("://")[-1] for e in earlier_files}
    mine = [f for f in ds.get_fragments() if f.path.split("://")[-1] not in earlier]
    fresh = sum(f.count_rows() for f in mine)
    actors = {w for f in mine for w in f.to_table(columns=["worker"]).column("worker").to_pylist()} - {None}
    ok = t.filter(t["error"].is_null())
    kept = ok["n_visual_tokens_kept"].to_pylist()
    errors = pc.value_counts(t["error"].drop_null()).to_pylist() if t.num_rows else []
    top = max(errors, key=lambda e: e["counts"], default={"values": None, "counts": 0})
    return JobSummary(
        rows=t.num_rows,
        ids=pc.count_distinct(t["id"]).as_py() if t.num_rows else 0,
        ok=ok.num_rows,
        failed=t.num_rows - ok.num_rows,
        processed=fresh,
        actors=len(actors),
        seconds=seconds,
        items_per_s=fresh / seconds if seconds > 0 else 0.0,
        mean_visual_tokens_kept=(sum(kept) / len(kept)) if kept else 0.0,
        output=job.output,
        top_error=top["values"],
        top_error_rows=top["counts"],
        unreadable=tuple(unreadable_records(job.output, job.s3)),
        handoff_bytes_per_item=_mean(ok["handoff_bytes"]) if "handoff_bytes" in read else 0.0,
    )


def _mean(column) -> float:
    """Mean of an Arrow column's non-null values (0.0 when it has none)."""
    import pyarrow.compute as pc

    m = pc.mean(column).as_py() if len(column) else None
    return float(m) if m is not None else 0.0
