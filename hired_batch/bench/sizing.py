"""The sizing table of docs/cluster.md: per image size, the data path's measured items/s
per CPU and the ideal model's items/s per GPU, so the CPUs and object-store memory a GPU
node needs (``python -m hired_batch.bench.sizing``).

For each ``--sizes`` entry it writes ``--rows`` photo-like JPEGs of that size
(``scale_data.photo``) and runs ``hired-batch plan``'s pass over them once per selection
(``hired`` at ``--budget``, and ``full``), every row through the engine's whole
preprocessing (timed), on one embedded Ray. Nothing here is a new measurement method:
the figures are plan's (``plan.run_plan``).
"""

from __future__ import annotations

import argparse
import tempfile

# Items a generation actor holds in the object store while it works: the batch it runs
# and the next one queued (a sizing rule, not a measurement)
BUFFERED_BATCHES = 2


def sizing_rows(model: str, sizes, rows: int, engine: str, preset: str, gpu: str, budget: float, workdir) -> list:
    """One dict per (image size, selection): the data path and the predicted GPU side."""
    from hired_batch.bench.gpus import get_gpu
    from hired_batch.bench.plan import plan_job, run_plan
    from hired_batch.bench.scale_data import parse_size, write_shards

    out = []
    for text in sizes:
        hw = parse_size(text)
        src = f"{workdir}/{text}"
        write_shards(src, rows, 1, bad_every=0, size=hw)
        for selector in ("hired", "full"):
            options = dict(input=[src], model=model, engine=engine, selector=selector, budget=budget, batch_size="auto")
            job = plan_job(options, f"{workdir}/scratch-{text}-{selector}")
            settings = dict(gpus=[get_gpu(gpu)], engines=[engine])
            report = run_plan(job, settings, preset, measure_every=1)
            t, p = report.tally, report.predictions[0]
            per_item = t.measured_bytes / t.measured_rows
            out.append(
                dict(
                    size=text,
                    selection=report.selection,
                    engine=engine,
                    data_items_per_s_per_cpu=t.items_per_cpu_s,
                    handoff_mb_per_item=per_item / 1e6,
                    visual_tokens=t.mean_visual(),
                    batch=p.batch_size,
                    gpu_items_per_s=p.items_per_s,
                    cpus_per_gpu=p.cpus_per_gpu,
                    object_store_gb_per_gpu=BUFFERED_BATCHES * (p.batch_size or 0) * per_item / 1e9,
                )
            )
    return out


def table(rows: list, gpu: str) -> str:
    """The rows as the Markdown table docs/cluster.md shows."""
    lines = [
        f"| image | selection | engine | data path items/s per CPU | handoff MB/item | visual tokens | "
        f"batch ({gpu}, auto) | ideal items/s per {gpu} | CPUs per {gpu} | object store GB per {gpu} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['selection']} | {r['engine']} | {r['data_items_per_s_per_cpu']:.1f} | "
            f"{r['handoff_mb_per_item']:.2f} | {r['visual_tokens']:.0f} | {r['batch']} | {r['gpu_items_per_s']:.1f} | "
            f"{r['cpus_per_gpu']:.1f} | {r['object_store_gb_per_gpu']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hired_batch.bench.sizing", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint whose processor preprocesses (weights never loaded)")
    p.add_argument("--sizes", default="480x640,768x1024,3000x4000", help="HEIGHTxWIDTH, comma-separated")
    p.add_argument("--rows", type=int, default=48, help="rows per image size")
    p.add_argument("--engine", default="hf", help="whose preprocessing runs: hf or vllm")
    p.add_argument("--preset", default="llava-next-7b", help="the model shapes the GPU side is predicted for")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--budget", type=float, default=0.2, help="HiRED's budget")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray")
    a = p.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="hired-batch-sizing-") as work:
        rows = sizing_rows(a.model, a.sizes.split(","), a.rows, a.engine, a.preset, a.gpu, a.budget, work)
    print(table(rows, a.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
