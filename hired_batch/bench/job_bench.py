"""``hired-batch bench --pipeline``: the bench rows' items through the real Ray Data job.

Each given row's items (the same synthetic images as PNG bytes in a temporary Parquet
file, the same questions) run through ``hired_batch.job.run_job`` on an embedded Ray,
with the row's engine, selector, budget, batch size, dtype and ``max_new_tokens`` (early
stop off); a vLLM row also passes its engine's KV-cache bytes and ``max_model_len``. The steady-state rate is taken by difference of two jobs, over 2n and n items,
so what a job pays once cancels (docs/performance.md, "Pipeline overhead").
"""

from __future__ import annotations

import time

from hired_batch.bench.workload import workload


def _write_parquet(path: str, n: int) -> str:
    """The first n workload items as a Parquet file (id, PNG image bytes, question)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.engine.inputs import image_to_bytes

    rows = [dict(id=f"bench-{i:04d}", image=image_to_bytes(im), question=q) for i, (im, q) in enumerate(workload(n))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _job_options(row: dict, model_path: str, args, inp: str, out: str) -> dict:
    """``hired-batch run`` options for one bench row (the Ray of ``run_pipeline``: 2 CPUs, the engine's GPU if any).

    A vLLM row (``engine`` "vllm"): the job's engine gets the bare engine's KV-cache bytes
    (``--memory-limit``) and ``max_model_len``, and ``batch_size`` as its sequence cap.
    """
    opts = dict(
        input=inp,
        output=out,
        model=model_path,
        selector=row["selector"],
        budget=row["budget"],
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        batch_size=row["batch_size"],
        dtype=args.dtype,
        vision_chunk=args.vision_chunk,
        overwrite=True,
    )
    if row.get("engine") == "vllm":
        opts.update(engine="vllm", memory_limit=int(row["kv_cache_bytes"]), max_model_len=int(row["max_model_len"]))
    return opts


def _run_pipeline_job(row, model_path, args, work: str, n: int) -> tuple[float, float, float]:
    """One job over the first n items: (wall seconds of run_job, generate-busy items/s,
    bytes per item through the object store, the summary's ``handoff_bytes_per_item``).

    Early stop is off as in the engine runs (min_new_tokens = max_new_tokens). Busy
    items/s = rows / the sum of t_batch_s over distinct batch ids: the generation
    actor's own rate, gaps between batches excluded.
    """
    import os
    from dataclasses import replace

    import pyarrow.parquet as pq

    from hired_batch.job import job_from_options, run_job

    inp = _write_parquet(os.path.join(work, f"in-{n}.parquet"), n)
    job = job_from_options(_job_options(row, model_path, args, inp, os.path.join(work, f"out-{n}")))
    job = replace(job, generation=replace(job.generation, min_new_tokens=job.generation.max_new_tokens))
    s = run_job(job)
    if s.failed or s.rows != n:
        raise RuntimeError(f"pipeline job for {row['label']}: {s.rows} rows, {s.failed} failed (expected {n} ok)")
    t = pq.read_table(job.output, columns=["batch_id", "t_batch_s"]).to_pylist()
    busy = sum(dict((r["batch_id"], r["t_batch_s"]) for r in t).values())
    return s.seconds, n / busy, s.handoff_bytes_per_item


def _pipeline_row(row: dict, model_path: str, args, ray_start_s: float) -> None:
    """Add the job's numbers to one bench row.

    Steady state by difference: jobs over 2n and n items (2n first, so cold-start costs
    land in the larger job and can only lower the result); the fixed costs (actor
    start, model load, pipeline fill, write, read-back) cancel, so
    pipeline_items_per_s = n / (wall(2n) - wall(n)).
    """
    import tempfile

    n = row["items"]
    with tempfile.TemporaryDirectory(prefix="hired_bench_pipe_") as work:
        wall2, busy2, handoff2 = _run_pipeline_job(row, model_path, args, work, 2 * n)
        wall1, busy1, _ = _run_pipeline_job(row, model_path, args, work, n)
    if wall2 > wall1:
        rate = n / (wall2 - wall1)
    else:
        rate = float("nan")
        print(
            f"  warning: the {2 * n}-item job was not slower than the {n}-item one ({wall2:.1f} vs {wall1:.1f} s): "
            "noise exceeds the work; raise --items",
            flush=True,
        )
    row.update(
        pipeline_items_per_s=rate,
        pipeline_ratio=rate / row["items_per_s"],
        pipeline_wall_s=[wall2, wall1],
        pipeline_items=[2 * n, n],
        pipeline_ray_start_s=ray_start_s,
        pipeline_busy_items_per_s=[busy2, busy1],
        pipeline_e2e_items_per_s=n / (ray_start_s + wall1),
        pipeline_handoff_bytes=handoff2,  # per item, preprocessing -> generation
    )
    print(
        f"  pipeline {row['label']} batch {row['batch_size']}: job walls {wall2:.1f} s ({2 * n} items), "
        f"{wall1:.1f} s ({n} items) -> steady {rate:.3f} items/s vs engine {row['items_per_s']:.3f} "
        f"(ratio {row['pipeline_ratio']:.2f}); generate-busy {busy2:.3f} / {busy1:.3f} items/s; "
        f"object store {handoff2 / 1e6:.3f} MB per item",
        flush=True,
    )


def run_pipeline(rows: list[dict], model_path: str, args) -> None:
    """Run each row's items through the Ray Data job (adding its ``pipeline_*`` keys); print the comparison."""
    import ray
    import torch

    from hired_batch.job.run import init_ray

    started = not ray.is_initialized()
    t0 = time.perf_counter()
    gpus = init_ray(num_cpus=2, num_gpus=min(torch.cuda.device_count(), 1))
    ray_start_s = time.perf_counter() - t0
    print(
        f"\n# pipeline: Ray Data job on embedded Ray (2 CPUs, {'1 GPU' if gpus else 'no GPU'}), "
        f"Ray start {ray_start_s:.1f} s",
        flush=True,
    )
    try:
        for row in rows:
            _pipeline_row(row, model_path, args, ray_start_s)
    finally:
        if started:
            ray.shutdown()
    print()
    print(pipeline_table([r for r in rows if "pipeline_items_per_s" in r]))


def pipeline_table(rows: list[dict]) -> str:
    """Markdown: engine vs job items/s, and the raw end-to-end numbers behind them."""
    lines = [
        "| selector | batch | engine items/s | job items/s (steady) | job/engine | job generate-busy items/s | "
        "job walls s (items) | end-to-end items/s (Ray start + job) | object store MB per item |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        walls = ", ".join(f"{w:.1f} ({n})" for w, n in zip(r["pipeline_wall_s"], r["pipeline_items"]))
        busy = " / ".join(f"{b:.3f}" for b in r["pipeline_busy_items_per_s"])
        lines.append(
            f"| {r['label']} | {r['batch_size']} | {r['items_per_s']:.3f} | {r['pipeline_items_per_s']:.3f} | "
            f"{r['pipeline_ratio']:.2f} | {busy} | {walls} | {r['pipeline_e2e_items_per_s']:.3f} | "
            f"{r.get('pipeline_handoff_bytes', 0.0) / 1e6:.3f} |"
        )
    return "\n".join(lines)
