"""``hired-batch bench``: throughput, latency and memory of each selector and budget.

A synthetic workload (random-pixel images of common sizes, short VQA questions) goes
through ``HiredEngine.generate_prepared`` with early stop disabled
(``min_new_tokens = max_new_tokens``), so every configuration decodes the same length.
Per configuration (selector, budget, batch size) it reports the medians of several
timed repeats after untimed warm-up batches, the measured speedup over ``full`` at the
same batch size and the speedup the FLOP/byte model (hired_batch.ideal) predicts.

How it measures (docs/performance.md has the definitions):
- repeats are interleaved (repeat 1 of every configuration, then repeat 2, ...), so
  load from other processes on a shared machine hits all configurations alike;
- preprocessing (the CPU stage of the pipeline) is done once, outside the timing;
- batches are grouped by planned visual-token count (``--order grouped``);
- CPU stall: the share of each repeat during which some task waited for a CPU
  (Linux PSI), so a reader can see which rows other load disturbed;
- peak memory: CUDA max allocated, or on CPU the process's RSS high-water mark reset
  before each timed repeat (/proc/self/clear_refs, after malloc_trim), so each
  configuration's peak is its own even though RSS is process-wide.

With ``--pipeline`` the same items also go through the real Ray Data job (embedded
Ray, ``hired_batch.runner``), and each fixed-batch row gets the job's steady-state
items/s next to the engine's. Without it this module does not start Ray.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

DEFAULT_SELECTORS = "full,hired:0.4,hired:0.2,hired:0.1,spatial:0.2"
# (height, width): a 2x2 LLaVA-NeXT canvas filled exactly, a 4:3 photo (2x2 with
# padding), a tall 3x1 and a wide 1x2: 2928, 2340, 2376, 1752 full visual tokens.
SIZES = [(672, 672), (480, 640), (1008, 336), (336, 672)]
QUESTIONS = ["What is in the image?", "How many people are there?", "What color is the car?",
             "Is there a dog in the picture?"]
ROW_KEYS = ("selector", "budget", "batch_size", "items_per_s", "visual_tokens_per_item", "ttft_s",
            "decode_tokens_per_s", "peak_mem_bytes", "selection_share", "speedup", "ideal_speedup")


@dataclass(frozen=True)
class Spec:
    """One selector setting of the sweep."""

    selector: str  # full | hired | spatial | random
    budget: float  # fraction of P*576 tokens (1.0 for full)

    @property
    def label(self) -> str:
        return "full" if self.selector == "full" else f"{self.selector}:{self.budget:g}"


def parse_selectors(text: str) -> list[Spec]:
    """'full,hired:0.2,spatial:0.2' -> Specs; a bare selector other than full means budget 0.2."""
    from hired_batch.config import SELECTORS

    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, budget = part.partition(":")
        if name not in SELECTORS:
            raise ValueError(f"--selectors: {name!r} is not one of {SELECTORS}")
        try:
            b = 1.0 if name == "full" else float(budget or 0.2)
        except ValueError:
            raise ValueError(f"--selectors: budget of {part!r} must be a fraction such as 0.2") from None
        if not 0.0 < b <= 1.0:
            raise ValueError(f"--selectors: budget of {part!r} must be in (0, 1]")
        out.append(Spec(name, b))
    if not out:
        raise ValueError("--selectors: expected at least one selector, e.g. full,hired:0.2")
    return out


def parse_batch_sizes(text: str) -> list:
    """'1,4' -> [1, 4]; 'auto' (alone or in the list) -> the memory-fitted size per selector."""
    from hired_batch.memory import parse_batch_size

    out = [parse_batch_size(p) for p in text.split(",") if p.strip()]
    if not out:
        raise ValueError("--batch-sizes: expected e.g. 1,4 or auto")
    return out


# --------------------------------------------------------------------------- CLI


def add_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_mutually_exclusive_group()
    m.add_argument("--preset", choices=["tiny", "scaled", "llava-next-7b"], default=None,
                   help="random-weight model size (default scaled); built once and cached")
    m.add_argument("--model", help="a LLaVA / LLaVA-NeXT checkpoint directory or hub id instead of a preset")
    p.add_argument("--cache-dir", help="where presets are built (default ~/.cache/hired_batch/presets)")
    p.add_argument("--selectors", default=DEFAULT_SELECTORS, help=f"comma list (default {DEFAULT_SELECTORS})")
    p.add_argument("--mode", choices=["exact", "reference"], default="exact", help="HiRED mode")
    p.add_argument("--batch-sizes", default="1,4", help="comma list of ints and/or 'auto' (default 1,4)")
    p.add_argument("--items", type=int, help="items per repeat (default: 4, rounded up to a multiple of the batch)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens decoded per item, early stop off")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per configuration first")
    p.add_argument("--order", choices=["grouped", "given"], default="grouped",
                   help="batch items by planned visual-token count, or keep the workload order")
    p.add_argument("--memory-limit", help="for 'auto': bytes a batch may use, weights included (e.g. 8GB); "
                                          "default: free GPU memory, else available host memory")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--vision-chunk", type=int, default=8, help="image crops per vision-tower call (default 8)")
    p.add_argument("--json", help="write {'rows': [...]} here")
    p.add_argument("--plot", help="write a PNG (items/s and peak memory against batch size) here")
    p.add_argument("--ideal-only", action="store_true",
                   help="no model run: print the FLOP/byte model's prediction for the preset's shapes")
    p.add_argument("--pipeline", action="store_true",
                   help="also run each fixed-batch configuration's items through the Ray Data job (embedded "
                        "Ray, 2 CPUs) and report its steady-state items/s and the ratio job/engine")
    p.add_argument("--peak-tflops", type=float, help="roofline compute peak (default: measured matmul)")
    p.add_argument("--mem-bw-gbs", type=float, help="roofline memory bandwidth, GB/s (default: measured copy)")


def add_parser(subparsers) -> None:
    """Register ``hired-batch bench``."""
    p = subparsers.add_parser("bench", help="benchmark selectors/budgets/batch sizes on a synthetic workload",
                              description=__doc__.split("\n\n")[0])
    add_flags(p)
    p.set_defaults(func=run_bench)


def main(argv=None) -> int:
    """Standalone entry (jobs/benchmark.py)."""
    from hired_batch.cli import run_standalone

    return run_standalone("benchmark", __doc__.split("\n\n")[0], add_flags, run_bench, argv)


# --------------------------------------------------------------------------- setup


def _check_args(args) -> tuple[list, list]:
    specs = parse_selectors(args.selectors)
    sizes = parse_batch_sizes(args.batch_sizes)
    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.items is not None and args.items < 1:
        raise ValueError(f"--items must be >= 1, got {args.items}")
    if args.memory_limit is not None:
        from hired_batch.memory import parse_bytes

        parse_bytes(args.memory_limit)
    return specs, sizes


def _roofline(args, device: str, dtype: str):
    from hired_batch import ideal

    roof = None
    if args.peak_tflops is None or args.mem_bw_gbs is None:
        roof = ideal.calibrate(device, dtype)
    flops = args.peak_tflops * 1e12 if args.peak_tflops else roof.flops_per_s
    bw = args.mem_bw_gbs * 1e9 if args.mem_bw_gbs else roof.bytes_per_s
    return ideal.Roofline(flops, bw)


def _workload(n: int, seed: int = 0):
    """n (PIL image, question) pairs cycling through SIZES and QUESTIONS."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        out.append((Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), QUESTIONS[i % len(QUESTIONS)]))
    return out


def _n_items(args, batch: int) -> int:
    base = args.items or len(SIZES)
    return -(-max(base, batch) // batch) * batch


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    """Everything measured for one configuration."""

    spec: Spec
    batch_size: int
    auto: bool
    batches: list  # lists of item indices, in run order
    results: list  # per repeat: list of BatchResult (one per batch)
    walls: list  # per repeat: seconds for all batches
    peaks: list  # per repeat: PeakMemory
    backoffs: int = 0
    stalls: list = field(default_factory=list)  # per repeat: share of wall time some task waited for a CPU


def _cpu_stall_us() -> int | None:
    """Linux PSI: total microseconds some runnable task waited for a CPU (None if absent).

    On a shared machine this says how much of a repeat other processes disturbed.
    """
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def _engine(model, processor, spec: Spec, args):
    from hired_batch.config import GenerationConfig, SelectionConfig
    from hired_batch.model import HiredEngine

    sel = SelectionConfig(selector=spec.selector, budget=spec.budget, mode=args.mode)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    return HiredEngine(model, processor, sel, gen, vision_chunk=args.vision_chunk)


def _plan(engine, prepared, batch: int, order: str) -> list[list[int]]:
    from hired_batch.memory import group_by_count

    if order == "given":
        return [list(range(i, min(i + batch, len(prepared)))) for i in range(0, len(prepared), batch)]
    # Planned prompt length (visual + text): equal lengths in a batch need no padding
    # mask, and SDPA keeps its causal fast path.
    lengths = [engine.planned_count(tuple(int(v) for v in p.image_size)) + len(p.input_ids) - 1 for p in prepared]
    return group_by_count(lengths, batch)


def _timed_repeat(engine, prepared, run: Run, device: str) -> None:
    from hired_batch.memory import PeakMemory, run_with_oom_backoff

    def gen(idx):
        return engine.generate_prepared([prepared[i] for i in idx])

    results, stall0, t0 = [], _cpu_stall_us(), time.perf_counter()
    with PeakMemory(device) as pm:
        for idx in run.batches:
            done, size = run_with_oom_backoff(gen, idx, len(idx))
            run.backoffs += size < len(idx)
            results.extend(r for _, r in done)
    run.walls.append(time.perf_counter() - t0)
    stall1 = _cpu_stall_us()
    if stall0 is not None and stall1 is not None:
        run.stalls.append((stall1 - stall0) / 1e6 / run.walls[-1])
    run.results.append(results)
    run.peaks.append(pm)


def _item_tokens(engine, prepared, results) -> list:
    """ItemTokens of what actually ran, for the ideal model (one list per batch)."""
    from hired_batch.ideal import ItemTokens

    full = engine.selection.selector == "full"
    out, k = [], 0
    for r in results:
        batch = []
        for it in r.items:
            P = prepared[k].pixel_values.shape[0]
            kept = it["n_visual_tokens_kept"]
            batch.append(ItemTokens(P, kept, it["n_prompt_tokens"] - kept,
                                    n_projected=P * engine.n_tokens if full else None))
            k += 1
        out.append(batch)
    return out


# --------------------------------------------------------------------------- metrics


def _row(run: Run, engine, prepared, dims, roof, max_new: int) -> dict:
    from hired_batch import ideal

    items = [prepared[i] for idx in run.batches for i in idx]
    n = len(items)
    wall = statistics.median(run.walls)
    res = [r for rep in run.results for r in rep]
    vis = sum(r.t_vision_s for r in res)
    dec = [sum(len(r.items) * (max_new - 1) for r in rep) / max(sum(r.t_decode_s for r in rep), 1e-12)
           for rep in run.results]
    kept = [it["n_visual_tokens_kept"] for r in run.results[0] for it in r.items]
    batches = _item_tokens(engine, items, run.results[0])
    t_ideal = ideal.workload_time(dims, batches, max_new, roof)
    peak = max(p.peak for p in run.peaks)
    delta = max(p.delta for p in run.peaks)
    return dict(
        selector=run.spec.selector, budget=run.spec.budget, batch_size=run.batch_size,
        items_per_s=n / wall, visual_tokens_per_item=sum(kept) / len(kept),
        ttft_s=statistics.median(r.t_vision_s + r.t_prefill_s for r in res),
        decode_tokens_per_s=statistics.median(dec), peak_mem_bytes=int(peak),
        selection_share=sum(r.t_select_s for r in res) / vis if vis > 0 else 0.0,
        speedup=None, ideal_speedup=None,
        # extras (not in the list): what the numbers above came from
        label=run.spec.label, batch_mode="auto" if run.auto else "fixed", items=n,
        repeats=len(run.walls), wall_s=run.walls, mem_per_item_bytes=int(delta / run.batch_size),
        t_vision_s=statistics.median(r.t_vision_s for r in res),
        t_select_s=statistics.median(r.t_select_s for r in res),
        prompt_tokens_per_item=sum(it["n_prompt_tokens"] for r in run.results[0] for it in r.items) / n,
        ideal_items_per_s=n / t_ideal, oom_backoffs=run.backoffs,
        items_per_s_best=n / min(run.walls),  # fastest repeat: least disturbed by other load
        cpu_stall_share=statistics.median(run.stalls) if run.stalls else None,
    )


def _add_speedups(rows: list[dict]) -> None:
    """speedup and ideal_speedup over `full` at the same batch size (auto rows: over full's auto row)."""
    for r in rows:
        ref = [f for f in rows if f["selector"] == "full" and f["batch_mode"] == r["batch_mode"]
               and (r["batch_mode"] == "auto" or f["batch_size"] == r["batch_size"])]
        if ref:
            f = ref[0]
            r["speedup"] = r["items_per_s"] / f["items_per_s"]
            r["ideal_speedup"] = r["ideal_items_per_s"] / f["ideal_items_per_s"]


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def table(rows: list[dict]) -> str:
    """The Markdown table printed on stdout."""
    head = ("| selector | batch | items/s | vis tok/item | TTFT s | decode tok/s | peak MB | MB/item | "
            "select % of vision | speedup | ideal | measured/ideal | CPU stall % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None
        batch = f"{r['batch_size']} (auto)" if r["batch_mode"] == "auto" else str(r["batch_size"])
        lines.append(
            f"| {r['label']} | {batch} | {r['items_per_s']:.3f} | {r['visual_tokens_per_item']:.0f} | "
            f"{r['ttft_s']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['peak_mem_bytes'] / 1e6:.0f} | "
            f"{r['mem_per_item_bytes'] / 1e6:.0f} | {100 * r['selection_share']:.2f} | "
            f"{_fmt(r['speedup'])} | {_fmt(r['ideal_speedup'])} | {_fmt(ratio)} | "
            f"{_fmt(r['cpu_stall_share'] and 100 * r['cpu_stall_share'], '{:.0f}')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """items/s and peak memory against batch size, one line per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rs]
        a.plot(x, [r["items_per_s"] for r in rs], marker="o", label=label)
        b.plot(x, [r["peak_mem_bytes"] / 1e9 for r in rs], marker="o", label=label)
    a.set(xlabel="batch size", ylabel="items/s", title="throughput")
    b.set(xlabel="batch size", ylabel="peak memory (GB)", title="peak memory")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main flow


def _resolve_model(args) -> tuple[str, str]:
    """(checkpoint path, name for the header)."""
    if args.model:
        return args.model, args.model
    from hired_batch.presets import ensure_checkpoint

    name = args.preset or "scaled"
    return str(ensure_checkpoint(name, args.cache_dir)), f"preset {name}"


def _header(name, path, model, dims, roof, device, args) -> str:
    from hired_batch import ideal

    n_params = sum(p.numel() for p in model.parameters())
    return "\n".join([
        f"# hired-batch bench: {name} ({path})",
        f"- device {device}, dtype {str(model.dtype).replace('torch.', '')}, {n_params / 1e6:.1f}M parameters, "
        f"torch threads {__import__('torch').get_num_threads()}",
        f"- LM:vision FLOPs per token {ideal.flop_ratio(dims):.1f}:1 (weights), "
        f"{ideal.flop_ratio(dims, 2950):.1f}:1 (attention included, 577-token crops vs a 2950-token prompt)",
        f"- roofline {roof.flops_per_s / 1e12:.2f} TFLOP/s, {roof.bytes_per_s / 1e9:.1f} GB/s",
        f"- workload: images {SIZES} (h, w), max_new_tokens {args.max_new_tokens} (early stop off), "
        f"{args.repeats} repeats (median), {args.warmup} warm-up batch(es), order {args.order}",
        f"- command: hired-batch bench {' '.join(sys.argv[2:]) if sys.argv[1:2] == ['bench'] else ' '.join(sys.argv[1:])}",
    ])


def run_bench(args) -> int:
    specs, batch_sizes = _check_args(args)
    if args.ideal_only:
        return _ideal_only(args, specs, batch_sizes)
    import torch

    from hired_batch.config import ModelConfig
    from hired_batch.ideal import ModelDims
    from hired_batch.model import Preprocessor, load_llava

    path, name = _resolve_model(args)
    model, processor = load_llava(ModelConfig(path=path, dtype=args.dtype, device=args.device))
    device = str(next(model.parameters()).device)
    dims = ModelDims.from_hf(model.config, bytes_per_param=torch.finfo(model.dtype).bits // 8)
    roof = _roofline(args, device, str(model.dtype).replace("torch.", ""))
    print(_header(name, path, model, dims, roof, device, args), flush=True)
    pre = Preprocessor(processor, model.config.model_type)
    engines = {s: _engine(model, processor, s, args) for s in specs}
    runs = [r for bs in batch_sizes for r in _plan_runs(engines, pre, dims, bs, args, device)]
    _measure(runs, engines, args, device)
    if args.peak_tflops is None or args.mem_bw_gbs is None:  # again at the end: keep the quieter one
        again = _roofline(args, device, str(model.dtype).replace("torch.", ""))
        roof = type(roof)(max(roof.flops_per_s, again.flops_per_s), max(roof.bytes_per_s, again.bytes_per_s))
        print(f"- roofline (best of the calibrations before and after): {roof.flops_per_s / 1e12:.2f} TFLOP/s, "
              f"{roof.bytes_per_s / 1e9:.1f} GB/s")
    rows = [_row(run, engines[run.spec], prep, dims, roof, args.max_new_tokens) for run, prep in runs]
    _add_speedups(rows)
    print()
    print(table(rows))
    if args.pipeline:
        _pipeline(rows, path, args)
    _write(rows, args)
    return 0


def _plan_runs(engines, pre, dims, bs, args, device) -> list:
    """(Run, prepared items) per selector for one batch-size setting."""
    from hired_batch.memory import auto_batch_size, memory_limit

    out = []
    limit = memory_limit(args.memory_limit, device) if bs == "auto" else None
    for spec, eng in engines.items():
        if bs == "auto":
            probe = [pre(im, q) for im, q in _workload(len(SIZES))]
            batch = auto_batch_size(dims, [_planned_tokens(eng, p) for p in probe], args.max_new_tokens, limit,
                                    vision_chunk=eng.vision_chunk)
            print(f"- auto batch for {spec.label}: {batch} (limit {limit / 1e9:.2f} GB)", flush=True)
        else:
            batch = bs
        prepared = [pre(im, q) for im, q in _workload(_n_items(args, batch))]
        run = Run(spec, batch, bs == "auto", _plan(eng, prepared, batch, args.order), [], [], [])
        out.append((run, prepared))
    return out


def _planned_tokens(engine, p):
    from hired_batch.ideal import ItemTokens

    size = tuple(int(v) for v in p.image_size)
    P, full = p.pixel_values.shape[0], engine.selection.selector == "full"
    k = engine.planned_count(size)
    return ItemTokens(P, k, len(p.input_ids) - 1, n_projected=P * engine.n_tokens if full else None)


def _measure(runs, engines, args, device) -> None:
    """Warm up every configuration, then interleave the timed repeats."""
    for run, prepared in runs:
        eng = engines[run.spec]
        for idx in run.batches[: args.warmup]:
            eng.generate_prepared([prepared[i] for i in idx])
    for rep in range(args.repeats):
        for run, prepared in runs:
            _timed_repeat(engines[run.spec], prepared, run, device)
            print(f"  {run.spec.label} batch {run.batch_size} repeat {rep + 1}: {run.walls[-1]:.2f} s", flush=True)


def _write(rows, args) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


# --------------------------------------------------------------------------- pipeline


def _write_parquet(path: str, n: int) -> str:
    """The first n workload items as a Parquet file (id, PNG image bytes, question)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.data import image_to_bytes

    rows = [dict(id=f"bench-{i:04d}", image=image_to_bytes(im), question=q) for i, (im, q) in enumerate(_workload(n))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _job_options(row: dict, model_path: str, args, inp: str, out: str, gpus: int) -> dict:
    """``hired-batch run`` options for one bench row (embedded Ray: 2 CPUs, the engine's GPU if any)."""
    return dict(input=inp, output=out, model=model_path, selector=row["selector"], budget=row["budget"],
                mode=args.mode, max_new_tokens=args.max_new_tokens, batch_size=row["batch_size"],
                dtype=args.dtype, vision_chunk=args.vision_chunk, num_cpus=2, num_gpus=gpus, overwrite=True)


def _run_pipeline_job(row, model_path, args, work: str, n: int, gpus: bool) -> tuple[float, float]:
    """One job over the first n items: (wall seconds of run_job, generate-busy items/s).

    Early stop is off as in the engine runs (min_new_tokens = max_new_tokens). Busy
    items/s = rows / the sum of t_batch_s over distinct batch ids: the generation
    actor's own rate, gaps between batches excluded.
    """
    import os
    from dataclasses import replace

    import pyarrow.parquet as pq

    from hired_batch import runner

    inp = _write_parquet(os.path.join(work, f"in-{n}.parquet"), n)
    o = _job_options(row, model_path, args, inp, os.path.join(work, f"out-{n}"), int(gpus))
    job = runner.job_from_options(o, gpus_available=gpus)
    job = replace(job, generation=replace(job.generation, min_new_tokens=job.generation.max_new_tokens))
    s = runner.run_job(job)
    if s["failed"] or s["rows"] != n:
        raise RuntimeError(f"pipeline job for {row['label']}: {s['rows']} rows, {s['failed']} failed (expected {n} ok)")
    t = pq.read_table(job.output, columns=["batch_id", "t_batch_s"]).to_pylist()
    busy = sum(dict((r["batch_id"], r["t_batch_s"]) for r in t).values())
    return s["seconds"], n / busy


def _pipeline_row(row: dict, model_path: str, args, gpus: bool, ray_start_s: float) -> None:
    """Add the job's numbers to one bench row.

    Steady state by difference: jobs over 2n and n items (2n first, so cold-start costs
    land in the larger job and can only lower the result); the fixed costs (actor
    start, model load, pipeline fill, write, read-back) cancel, so
    pipeline_items_per_s = n / (wall(2n) - wall(n)).
    """
    import tempfile

    n = row["items"]
    with tempfile.TemporaryDirectory(prefix="hired_bench_pipe_") as work:
        wall2, busy2 = _run_pipeline_job(row, model_path, args, work, 2 * n, gpus)
        wall1, busy1 = _run_pipeline_job(row, model_path, args, work, n, gpus)
    rate = n / (wall2 - wall1) if wall2 > wall1 else float("nan")
    row.update(pipeline_items_per_s=rate, pipeline_ratio=rate / row["items_per_s"],
               pipeline_wall_s=[wall2, wall1], pipeline_items=[2 * n, n], pipeline_ray_start_s=ray_start_s,
               pipeline_busy_items_per_s=[busy2, busy1],
               pipeline_e2e_items_per_s=n / (ray_start_s + wall1))
    print(f"  pipeline {row['label']} batch {row['batch_size']}: job walls {wall2:.1f} s ({2 * n} items), "
          f"{wall1:.1f} s ({n} items) -> steady {rate:.3f} items/s vs engine {row['items_per_s']:.3f} "
          f"(ratio {row['pipeline_ratio']:.2f}); generate-busy {busy2:.3f} / {busy1:.3f} items/s", flush=True)


def _pipeline(rows: list[dict], model_path: str, args) -> None:
    """Run the fixed-batch rows' items through the Ray Data job; print the comparison."""
    import ray
    import torch

    from hired_batch import runner

    started = not ray.is_initialized()
    t0 = time.perf_counter()
    gpus = runner.init_ray(dict(num_cpus=2, num_gpus=min(torch.cuda.device_count(), 1)))
    ray_start_s = time.perf_counter() - t0
    print(f"\n# pipeline: Ray Data job on embedded Ray (2 CPUs, {'1 GPU' if gpus else 'no GPU'}), "
          f"Ray start {ray_start_s:.1f} s", flush=True)
    try:
        for row in rows:
            if row["batch_mode"] == "fixed":
                _pipeline_row(row, model_path, args, gpus, ray_start_s)
    finally:
        if started:
            ray.shutdown()
    print()
    print(pipeline_table([r for r in rows if "pipeline_items_per_s" in r]))


def pipeline_table(rows: list[dict]) -> str:
    """Markdown: engine vs job items/s, and the raw end-to-end numbers behind them."""
    lines = ["| selector | batch | engine items/s | job items/s (steady) | job/engine | job generate-busy items/s | "
             "job walls s (items) | end-to-end items/s (Ray start + job) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        walls = ", ".join(f"{w:.1f} ({n})" for w, n in zip(r["pipeline_wall_s"], r["pipeline_items"]))
        busy = " / ".join(f"{b:.3f}" for b in r["pipeline_busy_items_per_s"])
        lines.append(f"| {r['label']} | {r['batch_size']} | {r['items_per_s']:.3f} | {r['pipeline_items_per_s']:.3f} | "
                     f"{r['pipeline_ratio']:.2f} | {busy} | {walls} | {r['pipeline_e2e_items_per_s']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- ideal only


def _ideal_only(args, specs, batch_sizes) -> int:
    """The FLOP/byte model's prediction for a preset's shapes, without weights."""
    from hired_batch import ideal
    from hired_batch.ideal import weight_bytes
    from hired_batch.memory import auto_batch_size, batch_bytes, parse_bytes
    from hired_batch.presets import get_preset

    if args.model:
        raise ValueError("--ideal-only takes a --preset (shapes without weights), not --model")
    preset = get_preset(args.preset or "scaled")
    bpp = {"float32": 4, "float16": 2, "bfloat16": 2}.get(args.dtype)
    dims = preset.dims(bpp)
    if args.peak_tflops is None or args.mem_bw_gbs is None:
        raise ValueError("--ideal-only needs --peak-tflops and --mem-bw-gbs (the machine to model)")
    roof = ideal.Roofline(args.peak_tflops * 1e12, args.mem_bw_gbs * 1e9)
    n_text = 16  # "USER: <image>\n<question> ASSISTANT:" with a short question
    print(f"# ideal model: preset {preset.name}, {dims.bytes_per_param} bytes/param, "
          f"LM:vision {ideal.flop_ratio(dims):.1f}:1, roofline {args.peak_tflops} TFLOP/s {args.mem_bw_gbs} GB/s, "
          f"max_new_tokens {args.max_new_tokens}, images {SIZES}")
    rows = []
    for bs_arg in batch_sizes:
        for spec in specs:
            probe = [ideal.item_tokens(dims, hw, spec.selector, spec.budget, n_text) for hw in SIZES]
            bs = bs_arg
            if bs_arg == "auto":
                if args.memory_limit is None:
                    raise ValueError("--ideal-only with --batch-sizes auto needs --memory-limit")
                try:
                    bs = auto_batch_size(dims, probe, args.max_new_tokens, parse_bytes(args.memory_limit),
                                         vision_chunk=args.vision_chunk)
                except ValueError as e:
                    print(f"- {spec.label}: {e}")
                    continue
            items = [probe[i % len(SIZES)] for i in range(max(bs, len(SIZES)))]
            batches = [items[i:i + bs] for i in range(0, len(items), bs)]
            t = ideal.workload_time(dims, batches, args.max_new_tokens, roof)
            first = ideal.batch_time(dims, batches[0], args.max_new_tokens, roof)
            heavy = max(probe, key=lambda i: batch_bytes(dims, [i], args.max_new_tokens, args.vision_chunk))
            peak = batch_bytes(dims, [heavy] * bs, args.max_new_tokens, args.vision_chunk)
            rows.append(dict(label=spec.label, selector=spec.selector, batch_size=bs, auto=bs_arg == "auto",
                             est_mem=weight_bytes(dims) + peak, items_per_s=len(items) / t,
                             ttft_s=first.vision_s + first.prefill_s,
                             visual=sum(i.n_visual for i in items) / len(items)))
    print("| selector | batch | vis tok/item | est. memory GB | ideal items/s | ideal TTFT s | ideal speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        full = [f for f in rows if f["selector"] == "full" and f["auto"] == r["auto"]
                and (r["auto"] or f["batch_size"] == r["batch_size"])]
        sp = r["items_per_s"] / full[0]["items_per_s"] if full else None
        batch = f"{r['batch_size']} (auto)" if r["auto"] else r["batch_size"]
        print(f"| {r['label']} | {batch} | {r['visual']:.0f} | {r['est_mem'] / 1e9:.1f} | {r['items_per_s']:.3f} | "
              f"{r['ttft_s']:.2f} | {_fmt(sp)} |")
    return 0
