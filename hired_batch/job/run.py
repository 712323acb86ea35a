"""``run_job(job)``: the whole job from Python, as ``hired-batch run``, the demo and the
bench's job mode run it: checks before Ray, Ray (joined or embedded), the pipeline,
then the output read back into a ``JobSummary``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hired_batch.config import JobConfig


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

    def format(self) -> str:
        """The summary ``hired-batch run`` prints."""
        return (f"rows: {self.rows} (ok {self.ok}, failed {self.failed})  |  "
                f"this run: {self.processed} rows by {self.actors} generation actor(s), "
                f"{self.items_per_s:.2f} items/s over {self.seconds:.1f} s  |  "
                f"mean visual tokens kept {self.mean_visual_tokens_kept:.1f}\n"
                f"output: {self.output}")

    @property
    def duplicates_error(self) -> str | None:
        """The line to print when the output holds some id more than once (else None)."""
        if self.rows == self.ids:
            return None
        return (f"output {self.output} holds {self.rows} rows but only {self.ids} distinct ids: "
                f"{self.rows - self.ids} row(s) are duplicates; the output is not exactly once")


def run_job(job: JobConfig, *, address: str | None = None, num_cpus: int | None = None,
            num_gpus: int | None = None) -> JobSummary:
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
    from hired_batch.job.preflight import check_model, check_system_prompt, preflight
    from hired_batch.job.sources import check_hf_input, is_hf_job

    preflight(job)
    check_model(job.model.path)
    check_system_prompt(job.model.path, job.generation.system_prompt)
    if is_hf_job(job):
        check_hf_input(job.inputs[0])


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join ``address`` or RAY_ADDRESS, else start an embedded Ray (unless this process
    already has one); True if the cluster has GPUs."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # address="local": a fresh embedded Ray even when a `ray start` cluster
            # runs on this machine (joining one needs --address or RAY_ADDRESS)
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
    return ray.cluster_resources().get("GPU", 0) > 0


def execute(job: JobConfig) -> JobSummary:
    """Run the pipeline on the Ray this process has joined, then read the output back."""
    from hired_batch.job.output import clear_output, configure_checkpoint, existing_outputs, record_checkpoint, write_output
    from hired_batch.job.pipeline import build_pipeline

    t0 = time.perf_counter()
    configure_checkpoint(job)
    clear_output(job)
    record_checkpoint(job)
    before = set(existing_outputs(job))  # a resumed run's earlier files
    try:
        write_output(build_pipeline(job), job)
        return summarize(job, time.perf_counter() - t0, before)
    except FileNotFoundError as e:
        # not a user mistake once the job runs: a file vanished under us (the CLI would
        # otherwise report it as a bad path and exit 2)
        raise RuntimeError(f"a file went missing while the job ran: {e}") from e
    except Exception as e:
        from hired_batch.job.engine_health import engine_failure

        failed = engine_failure(e)  # an engine that failed the same way twice: one line, not Ray's traceback
        if failed is None:
            raise
        raise failed from None


def summarize(job: JobConfig, seconds: float, earlier_files=frozenset()) -> JobSummary:
    """The output directory as it is now; ``earlier_files`` were there before this run."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from hired_batch.job.sources import pyarrow_fs

    fs, path = pyarrow_fs(job.output, job.s3)
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    t = ds.to_table(columns=["id", "error", "n_visual_tokens_kept"])
    earlier = {e.split("://")[-1] for e in earlier_files}
    mine = [f for f in ds.get_fragments() if f.path.split("://")[-1] not in earlier]
    fresh = sum(f.count_rows() for f in mine)
    actors = {w for f in mine for w in f.to_table(columns=["worker"]).column("worker").to_pylist()} - {None}
    ok = t.filter(t["error"].is_null())
    kept = ok["n_visual_tokens_kept"].to_pylist()
    return JobSummary(rows=t.num_rows, ids=pc.count_distinct(t["id"]).as_py() if t.num_rows else 0,
                      ok=ok.num_rows, failed=t.num_rows - ok.num_rows, processed=fresh, actors=len(actors),
                      seconds=seconds, items_per_s=fresh / seconds if seconds > 0 else 0.0,
                      mean_visual_tokens_kept=(sum(kept) / len(kept)) if kept else 0.0, output=job.output)
