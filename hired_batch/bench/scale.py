"""Scale measurements (issue 22, docs/performance.md "Scale"): make many-shard inputs,
time the checks before the job (preflight, and the Ray id pass), and run a job that is
killed half way and resumed with ``--checkpoint``.

    python -m hired_batch.bench.scale shards DIR --rows 1000000 --shards 2000
    python -m hired_batch.bench.scale upload DIR s3://bucket/prefix --s3-endpoint URL
    python hired_batch/bench/scale.py preflight --input DIR --output OUT [--ray]
    python -m hired_batch.bench.scale kill-resume --input DIR --work W --model M [run flags]

``preflight`` imports only what every version of the job has (``job_from_options``,
``preflight``), so running this file by path with ``PYTHONPATH`` set to another checkout
measures that checkout (the "before" figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_shards(out: str, rows: int, shards: int, images: bool) -> None:
    """``shards`` Parquet files of ``rows`` rows in all: ``id`` (unique text), ``image``
    (a path string; with ``images``, small PNG bytes, 16 distinct ones cycled) and ``question``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    pngs = []
    if images:
        from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

        pngs = [image_to_bytes(make_synthetic_image(64 + 8 * (i % 4), 48 + 8 * (i // 4), i)) for i in range(16)]
    per = -(-rows // shards)
    for s in range(shards):
        lo, hi = s * per, min(rows, (s + 1) * per)
        ids = [f"r{i:09d}" for i in range(lo, hi)]
        image = pa.array([pngs[i % 16] for i in range(lo, hi)]) if images else pa.array([f"img/{i}.png" for i in ids])
        pq.write_table(
            pa.table({"id": ids, "image": image, "question": ["What is in the image?"] * len(ids)}),
            os.path.join(out, f"part-{s:05d}.parquet"),
        )


def upload(src: str, dest: str, endpoint: str) -> None:
    """Copy every file of ``src`` under ``dest`` (s3://bucket/prefix), 32 at once."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    bucket, _, prefix = dest[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    names = sorted(os.listdir(src))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda n: s3.upload_file(os.path.join(src, n), bucket, f"{prefix.rstrip('/')}/{n}"), names))


def time_preflight(inp: str, output: str, endpoint: str | None, with_ray: bool) -> dict:
    """Seconds of ``preflight`` (and, with ``with_ray``, of Ray's start and the Ray id
    pass, ``id_check.check_large_input_ids``) and the driver's peak memory."""
    import hired_batch.job.stages  # noqa: F401 - what preflight imports (torch...): not part of its time
    from hired_batch.job.options import job_from_options
    from hired_batch.job.preflight import preflight

    opts = {"input": inp, "output": output, **({"s3_endpoint": endpoint} if endpoint else {})}
    job = job_from_options(opts)
    result = {"rss_mb_before_preflight": round(current_rss_mb())}
    t0 = time.perf_counter()
    preflight(job)
    result.update(preflight_s=round(time.perf_counter() - t0, 2), peak_rss_mb_after_preflight=round(peak_rss_mb()))
    if with_ray:
        import ray

        from hired_batch.job.id_check import check_large_input_ids

        t1 = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        t2 = time.perf_counter()
        check_large_input_ids(job)
        result.update(ray_start_s=round(t2 - t1, 2), ray_id_pass_s=round(time.perf_counter() - t2, 2))
        ray.shutdown()
    result["driver_peak_rss_mb"] = round(peak_rss_mb())
    return result


def output_rows(output: str, seen: dict) -> int:
    """Rows in the Parquet files under ``output`` (each file's footer read once: ``seen``)."""
    import pyarrow.parquet as pq

    for root, _, names in os.walk(output):
        for n in names:
            path = os.path.join(root, n)
            if n.endswith(".parquet") and path not in seen:
                try:
                    seen[path] = pq.read_metadata(path).num_rows
                except Exception:  # noqa: BLE001 - a file being written: read it next time
                    pass
    return sum(seen.values())


class Sampler(threading.Thread):
    """Every ``every`` s: this process's resident memory and the object store's use
    (Ray's memory summary), peaks written to ``path`` each time (a killed run keeps them)."""

    def __init__(self, path: str, every: float = 1.0):
        super().__init__(daemon=True)
        self.path, self.every, self.peak = path, every, {"driver_rss_mb": 0.0, "object_store_mb": 0.0}

    def run(self):
        import re

        while True:
            rss = current_rss_mb()
            self.peak["driver_rss_mb"] = max(self.peak["driver_rss_mb"], rss)
            try:
                import ray
                from ray._private.internal_api import memory_summary

                if ray.is_initialized():
                    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
                    m = re.search(r"Plasma memory usage (\d+) MiB", summary)
                    if m:
                        self.peak["object_store_mb"] = max(self.peak["object_store_mb"], float(m.group(1)))
            except Exception:  # noqa: BLE001 - Ray starting or stopping: sample next time
                pass
            with open(self.path, "w") as f:
                json.dump({k: round(v) for k, v in self.peak.items()}, f)
            time.sleep(self.every)


def run_sampled(argv: list[str], peaks: str) -> int:
    """``hired-batch run ARGV`` in this process, sampled (``Sampler``)."""
    from hired_batch.config import ConfigError
    from hired_batch.job import runner

    parser = argparse.ArgumentParser(prog="hired-batch run")
    runner.add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = ["hired-batch", "run", *argv]
    Sampler(peaks).start()
    try:
        return runner.run_main(args)
    except ConfigError as e:  # one line, as the CLI prints it (e.g. an embedded Ray that timed out starting)
        print(f"hired-batch run: error: {e}", file=sys.stderr)
        return 2


def kill_resume(args, run_flags: list[str]) -> dict:
    """Run the job, SIGKILL it (its process group: driver and embedded Ray) once about half
    the rows are written, rerun the same command, and check every input row is in the
    output exactly once. Returns the figures."""
    import pyarrow.dataset as pads

    w = args.work
    out, ck = os.path.join(w, "out"), os.path.join(w, "ck")
    total = pads.dataset(args.input, format="parquet").count_rows()
    argv = ["--input", args.input, "--output", out, "--checkpoint", ck, "--model", args.model, *run_flags]
    cmd = [sys.executable, "-m", "hired_batch.bench.scale", "run-sampled", "--peaks"]
    figures: dict = {"rows": total}
    seen: dict = {}
    for phase in ("first", "resume"):
        peaks = os.path.join(w, f"peaks-{phase}.json")
        before = output_rows(out, seen)
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, peaks, "--", *argv], start_new_session=True, stdout=subprocess.DEVNULL)
        first_new = None
        while proc.poll() is None:
            rows = output_rows(out, seen)
            if first_new is None and rows > before:
                first_new = time.perf_counter() - t0
            if phase == "first" and rows >= total // 2:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
                proc.wait()
                break
            time.sleep(1.0)
        rows = output_rows(out, seen)
        figures[phase] = {
            "exit": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1),
            "to_first_new_output_s": None if first_new is None else round(first_new, 1),
            "rows_in_output_after": rows,
            **json.load(open(peaks)),
        }
    ids = pads.dataset(out, format="parquet").to_table(columns=["id"]).column("id")
    wanted = pads.dataset(args.input, format="parquet").to_table(columns=["id"]).column("id")
    figures["exactly_once"] = len(ids) == total and set(ids.to_pylist()) == set(wanted.to_pylist())
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hired_batch.bench.scale", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shards", help="write a many-shard input")
    s.add_argument("out")
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--shards", type=int, required=True)
    s.add_argument("--images", action="store_true", help="small PNG bytes in `image` (else path strings)")
    u = sub.add_parser("upload", help="copy a folder's files to s3://bucket/prefix")
    u.add_argument("src")
    u.add_argument("dest")
    u.add_argument("--s3-endpoint", required=True)
    f = sub.add_parser("preflight", help="time preflight (and the Ray id pass) and the driver's peak memory")
    f.add_argument("--input", required=True)
    f.add_argument("--output", required=True)
    f.add_argument("--s3-endpoint")
    f.add_argument("--ray", action="store_true", help="also start Ray and run the Ray id pass")
    r = sub.add_parser("run-sampled", help="hired-batch run in this process, peaks sampled")
    r.add_argument("--peaks", required=True)
    k = sub.add_parser("kill-resume", help="run a job, kill it half way, resume it; check exactly once")
    k.add_argument("--input", required=True)
    k.add_argument("--work", required=True)
    k.add_argument("--model", required=True)
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if args.cmd == "shards":
        write_shards(args.out, args.rows, args.shards, args.images)
    elif args.cmd == "upload":
        upload(args.src, args.dest, args.s3_endpoint)
    elif args.cmd == "preflight":
        print(json.dumps(time_preflight(args.input, args.output, args.s3_endpoint, args.ray)))
    elif args.cmd == "run-sampled":
        return run_sampled(rest, args.peaks)
    else:
        print(json.dumps(kill_resume(args, rest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
