"""``hired-batch bench``: throughput, latency and memory of each selector and budget.

A synthetic workload (random-pixel images of common sizes, short VQA questions) goes
through ``HiredEngine.generate_prepared`` with early stop disabled
(``min_new_tokens = max_new_tokens``), so every configuration decodes the same length.
Per configuration (selector, budget, batch size) it reports the medians of several
timed repeats after untimed warm-up batches, the measured speedup over ``full`` at the
same batch size and the speedup the FLOP/byte model (hired_batch.bench.ideal) predicts.

How it measures (docs/performance.md has the definitions):
- repeats are interleaved (repeat 1 of every configuration, then repeat 2, ...), so
  load from other processes on a shared machine hits all configurations alike;
- preprocessing (the CPU stage of the pipeline) is done once, outside the timing;
- batches are grouped by planned prompt length, visual tokens included (``--order grouped``);
- CPU stall: the share of each repeat's wall time during which some task on the
  machine waited for a CPU (Linux PSI), so a reader can see which rows other load
  disturbed; the spread of the repeats (slowest-fastest items/s) says the same;
- peak memory: CUDA max allocated, or on CPU the process's RSS high-water mark reset
  before each timed repeat (/proc/self/clear_refs, after malloc_trim), so each
  configuration's peak is its own even though RSS is process-wide.

With ``--pipeline`` the same items also go through the real Ray Data job
(``job_bench.py``: embedded Ray, ``hired_batch.job.runner``), and each fixed-batch
row gets the job's steady-state items/s next to the engine's. Without it nothing
starts Ray. ``--ideal-only`` (``ideal_bench.py``) runs no model. ``--engine hf,vllm``
(``engine_compare.py``, its flags in ``compare_flags.py``) runs the same items through
stock vLLM, vLLM with the HiRED plugin and this engine instead of the sweep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field

from hired_batch.bench import PRESET_NAMES, compare_flags
from hired_batch.bench.workload import (
    SIZES,
    Spec,
    cpu_stall_us,
    fmt,
    machine,
    n_items,
    parse_selectors,
    plan_batches,
    planned_tokens,
    resolve_model,
    roofline,
    speedups_over_full,
    workload,
)
from hired_batch.config import ConfigError, GenerationConfig, ModelConfig, check_vision_chunk
from hired_batch.jsonio import write_json

DEFAULT_SELECTORS = "full,hired:0.4,hired:0.2,hired:0.1,spatial:0.2"
# Defaults of the sweep, and the smaller ones --quick uses (a flag given explicitly wins).
SWEEP_DEFAULTS = dict(selectors=DEFAULT_SELECTORS, batch_sizes="1,4", repeats=3)
QUICK_DEFAULTS = dict(selectors="full,hired:0.2", batch_sizes="1,2", repeats=2)
CPU_STALL_HELP = (
    "CPU stall %: share of a repeat's wall time during which some task on this machine "
    "waited for a CPU (Linux PSI, /proc/pressure/cpu 'some'), median over repeats; "
    "0 = undisturbed, a high value means other load (or more threads than cores) slowed "
    "that row: rerun it. '-' where PSI is not available."
)
ROW_KEYS = (
    "selector",
    "budget",
    "batch_size",
    "items_per_s",
    "visual_tokens_per_item",
    "ttft_s",
    "decode_tokens_per_s",
    "peak_mem_bytes",
    "selection_share",
    "speedup",
    "ideal_speedup",
)


def parse_batch_sizes(text: str) -> list:
    """'1,4' -> [1, 4]; 'auto' (alone or in the list) -> the memory-fitted size per selector."""
    from hired_batch.engine.batching import parse_batch_size

    out = [parse_batch_size(p) for p in text.split(",") if p.strip()]
    if not out:
        raise ConfigError("--batch-sizes: expected e.g. 1,4 or auto")
    return out


# --------------------------------------------------------------------------- CLI


def add_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="random-weight model size (default scaled); built once and cached",
    )
    m.add_argument("--model", help="a LLaVA / LLaVA-NeXT checkpoint directory or hub id instead of a preset")
    p.add_argument("--cache-dir", help="where presets are built (default ~/.cache/hired_batch/presets)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a short sanity run, about a quarter of the default sweep's work: selectors "
        f"{QUICK_DEFAULTS['selectors']}, batch sizes {QUICK_DEFAULTS['batch_sizes']}, "
        f"{QUICK_DEFAULTS['repeats']} repeats, unless those flags are given",
    )
    p.add_argument("--selectors", help=f"comma list (default {SWEEP_DEFAULTS['selectors']})")
    p.add_argument("--mode", choices=["exact", "reference"], default="exact", help="HiRED mode")
    p.add_argument("--batch-sizes", help=f"comma list of ints and/or 'auto' (default {SWEEP_DEFAULTS['batch_sizes']})")
    p.add_argument("--items", type=int, help="items per repeat (default: 4, rounded up to a multiple of the batch)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens decoded per item, early stop off")
    p.add_argument(
        "--repeats",
        type=int,
        help=f"timed repeats per configuration (default {SWEEP_DEFAULTS['repeats']}): the table gives "
        "the median and the slowest-fastest spread",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per configuration first")
    p.add_argument(
        "--order",
        choices=["grouped", "given"],
        default="grouped",
        help="batch items by planned prompt length (visual + text tokens), or keep the workload order",
    )
    p.add_argument(
        "--memory-limit",
        help="for 'auto': bytes a batch may use, weights included (e.g. 8GB); "
        "default: free GPU memory, else available host memory",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--vision-chunk",
        type=int,
        default=ModelConfig.vision_chunk,
        help=f"image crops per vision-tower call (default {ModelConfig.vision_chunk})",
    )
    p.add_argument("--json", help="write {'rows': [...]} here")
    p.add_argument("--plot", help="write a PNG (items/s and peak memory against batch size) here")
    p.add_argument(
        "--ideal-only",
        action="store_true",
        help="no model run: print the FLOP/byte model's prediction for the preset's shapes "
        "(needs --peak-tflops and --mem-bw-gbs: the machine to model)",
    )
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="also run each fixed-batch configuration's items through the Ray Data job (embedded "
        "Ray, 2 CPUs) and report its steady-state items/s and the ratio job/engine; with "
        "--engine ...vllm: the vLLM + HiRED rows of the short workload, through the job with "
        "--engine vllm and the bare engine's settings",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="roofline compute peak (default: a measured matmul; required with --ideal-only)",
    )
    p.add_argument(
        "--mem-bw-gbs",
        type=float,
        help="roofline memory bandwidth, GB/s (default: a measured copy; required with --ideal-only)",
    )
    compare_flags.add_flags(p)


def add_parser(subparsers) -> None:
    """Register ``hired-batch bench``."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark selectors/budgets/batch sizes on a synthetic workload",
        description=__doc__.split("\n\n")[0],
        epilog=CPU_STALL_HELP,
    )
    add_flags(p)
    p.set_defaults(func=run_bench)


# --------------------------------------------------------------------------- setup


def apply_defaults(args) -> None:
    """Fill the sweep flags the user left out: SWEEP_DEFAULTS, or QUICK_DEFAULTS with --quick."""
    defaults = QUICK_DEFAULTS if getattr(args, "quick", False) else SWEEP_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _check_args(args) -> tuple[list, list]:
    apply_defaults(args)
    specs = parse_selectors(args.selectors)
    sizes = parse_batch_sizes(args.batch_sizes)
    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_vision_chunk(args.vision_chunk)  # the engine's own check, before any model loads
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.items is not None and args.items < 1:
        raise ConfigError(f"--items must be >= 1, got {args.items}")
    if args.memory_limit is not None:
        from hired_batch.engine.batching import parse_bytes

        parse_bytes(args.memory_limit)
    return specs, sizes


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


def _engine(model, processor, spec: Spec, args):
    from hired_batch.engine.hf import HiredEngine

    sel = spec.selection(args.mode)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    return HiredEngine(model, processor, sel, gen, vision_chunk=args.vision_chunk)


def _timed_repeat(engine, prepared, run: Run, device: str) -> None:
    from hired_batch.engine.batching import PeakMemory, halve_on_oom

    results = []

    def gen(idx):
        results.append(engine.generate_prepared([prepared[i] for i in idx]))

    def alone(i, exc):
        raise exc  # the bench reports no error rows: an item that cannot run alone ends it

    stall0, t0 = cpu_stall_us(), time.perf_counter()
    with PeakMemory(device) as pm:
        for idx in run.batches:
            run.backoffs += halve_on_oom(gen, idx, alone) > 0  # the job's backoff (GenerateStage)
    run.walls.append(time.perf_counter() - t0)
    stall1 = cpu_stall_us()
    if stall0 is not None and stall1 is not None:
        run.stalls.append((stall1 - stall0) / 1e6 / run.walls[-1])
    run.results.append(results)
    run.peaks.append(pm)


def _item_tokens(engine, prepared, results) -> list:
    """ItemTokens of what actually ran, for the ideal model (one list per batch)."""
    from hired_batch.engine.dims import ItemTokens

    full = engine.selection.selector == "full"
    out, k = [], 0
    for r in results:
        batch = []
        for it in r.items:
            P = prepared[k].pixel_values.shape[0]
            kept = it["n_visual_tokens_kept"]
            batch.append(
                ItemTokens(P, kept, it["n_prompt_tokens"] - kept, n_projected=P * engine.n_tokens if full else None)
            )
            k += 1
        out.append(batch)
    return out


# --------------------------------------------------------------------------- metrics


def _row(run: Run, engine, prepared, dims, roof, max_new: int) -> dict:
    from hired_batch.bench import ideal
    from hired_batch.engine.batching import batch_bytes

    items = [prepared[i] for idx in run.batches for i in idx]
    n = len(items)
    wall = statistics.median(run.walls)
    res = [r for rep in run.results for r in rep]
    vis = sum(r.t_vision_s for r in res)
    dec = [
        sum(len(r.items) * (max_new - 1) for r in rep) / max(sum(r.t_decode_s for r in rep), 1e-12)
        for rep in run.results
    ]
    kept = [it["n_visual_tokens_kept"] for r in run.results[0] for it in r.items]
    batches = _item_tokens(engine, items, run.results[0])
    t_ideal = ideal.workload_time(dims, batches, max_new, roof)
    est = max(batch_bytes(dims, b, max_new, engine.vision_chunk) for b in batches)  # the memory model's peak
    peak = max(p.peak for p in run.peaks)
    delta = max(p.delta for p in run.peaks)
    return dict(
        selector=run.spec.selector,
        budget=run.spec.budget,
        batch_size=run.batch_size,
        items_per_s=n / wall,
        visual_tokens_per_item=sum(kept) / len(kept),
        ttft_s=statistics.median(r.t_vision_s + r.t_prefill_s for r in res),
        decode_tokens_per_s=statistics.median(dec),
        peak_mem_bytes=int(peak),
        selection_share=sum(r.t_select_s for r in res) / vis if vis > 0 else 0.0,
        speedup=None,
        ideal_speedup=None,
        # extras, beyond ROW_KEYS: what the numbers above came from
        label=run.spec.label,
        batch_mode="auto" if run.auto else "fixed",
        items=n,
        repeats=len(run.walls),
        wall_s=run.walls,
        mem_per_item_bytes=int(delta / run.batch_size),
        est_mem_per_item_bytes=int(est / run.batch_size),  # what auto batch sizing assumes, to compare
        t_vision_s=statistics.median(r.t_vision_s for r in res),
        t_select_s=statistics.median(r.t_select_s for r in res),
        prompt_tokens_per_item=sum(it["n_prompt_tokens"] for r in run.results[0] for it in r.items) / n,
        ideal_items_per_s=n / t_ideal,
        oom_backoffs=run.backoffs,
        items_per_s_best=n / min(run.walls),  # fastest repeat: least disturbed by other load
        items_per_s_worst=n / max(run.walls),  # slowest repeat: with best, the spread of the repeats
        cpu_stall_share=statistics.median(run.stalls) if run.stalls else None,
    )


def _add_speedups(rows: list[dict]) -> None:
    """speedup and ideal_speedup over `full` at the same batch size (auto rows: over full's auto row)."""

    def auto(r):
        return r["batch_mode"] == "auto"

    measured = speedups_over_full(rows, "items_per_s", auto)
    predicted = speedups_over_full(rows, "ideal_items_per_s", auto)
    for r, sp, ideal_sp in zip(rows, measured, predicted):
        if sp is not None:
            r["speedup"], r["ideal_speedup"] = sp, ideal_sp


def _spread(r: dict) -> str:
    """Slowest-fastest repeat's items/s ('-' with one repeat)."""
    if r.get("repeats", 1) < 2:
        return "-"
    return f"{r['items_per_s_worst']:.3f}-{r['items_per_s_best']:.3f}"


def table(rows: list[dict]) -> str:
    """The Markdown table printed on stdout."""
    head = (
        "| selector | batch | items/s | repeats: slowest-fastest | vis tok/item | TTFT s | decode tok/s | "
        "peak MB | MB/item | select % of vision | speedup | ideal | measured/ideal | CPU stall % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None
        batch = f"{r['batch_size']} (auto)" if r["batch_mode"] == "auto" else str(r["batch_size"])
        lines.append(
            f"| {r['label']} | {batch} | {r['items_per_s']:.3f} | {_spread(r)} | {r['visual_tokens_per_item']:.0f} | "
            f"{r['ttft_s']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['peak_mem_bytes'] / 1e6:.0f} | "
            f"{r['mem_per_item_bytes'] / 1e6:.0f} | {100 * r['selection_share']:.2f} | "
            f"{fmt(r['speedup'])} | {fmt(r['ideal_speedup'])} | {fmt(ratio)} | "
            f"{fmt(r['cpu_stall_share'] and 100 * r['cpu_stall_share'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def plot_figure(rows: list[dict], title: str):
    """items/s and peak memory against batch size, one line per selector (a matplotlib
    Figure, no pyplot state). Batch sizes are the ticks; both y axes start at 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rs]
        a.plot(x, [r["items_per_s"] for r in rs], marker="o", label=label)
        b.plot(x, [r["peak_mem_bytes"] / 1e9 for r in rs], marker="o", label=label)
    a.set(xlabel="batch size", ylabel="items/s (median of repeats)", title="throughput")
    b.set(xlabel="batch size", ylabel="peak memory (GB)", title="peak memory")
    sizes = sorted({int(r["batch_size"]) for r in rows})
    for ax in (a, b):
        ax.set_xticks(sizes)  # batch sizes are integers: no 1.5 tick
        ax.set_ylim(bottom=0)  # from 0, so heights compare as ratios
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: str, title: str) -> None:
    """Save ``plot_figure(rows, title)`` as a PNG."""
    plot_figure(rows, title).savefig(path, dpi=100)


# --------------------------------------------------------------------------- main flow


def _header(name, path, model, dims, roof, device, args) -> str:
    from hired_batch.bench import ideal

    n_params = sum(p.numel() for p in model.parameters())
    return "\n".join(
        [
            f"# hired-batch bench: {name} ({path})",
            f"- machine: {machine(device)}",
            f"- device {device}, dtype {str(model.dtype).replace('torch.', '')}, {n_params / 1e6:.1f}M parameters, "
            f"torch threads {__import__('torch').get_num_threads()}",
            f"- LM:vision FLOPs per token {ideal.flop_ratio(dims):.1f}:1 (weights), "
            f"{ideal.flop_ratio(dims, 2950):.1f}:1 (attention included, 577-token crops vs a 2950-token prompt)",
            f"- roofline {roof.flops_per_s / 1e12:.2f} TFLOP/s, {roof.bytes_per_s / 1e9:.1f} GB/s",
            f"- workload: images {SIZES} (h, w), max_new_tokens {args.max_new_tokens} (early stop off), "
            f"{args.repeats} repeats (median), {args.warmup} warm-up batch(es), order {args.order}",
            f"- command: hired-batch bench {' '.join(sys.argv[2:]) if sys.argv[1:2] == ['bench'] else ' '.join(sys.argv[1:])}",
        ]
    )


def run_bench(args) -> int:
    """``hired-batch bench``: the selector sweep on the HF engine, or with ``--engine`` naming
    vllm the engine comparison (``engine_compare``)."""
    if compare_flags.compares(args):
        from hired_batch.bench.engine_compare import run_compare

        return run_compare(args)
    specs, batch_sizes = _check_args(args)
    if args.ideal_only:
        from hired_batch.bench.ideal_bench import run_ideal_only

        return run_ideal_only(args, specs, batch_sizes)

    from hired_batch.engine.dims import ModelDims, bytes_per_param
    from hired_batch.engine.weights import Preprocessor, load_llava

    path, name = resolve_model(args)
    model, processor = load_llava(ModelConfig(path=path, dtype=args.dtype, device=args.device))
    device = str(next(model.parameters()).device)
    dims = ModelDims.from_hf(model.config, bytes_per_param=bytes_per_param(model.dtype))
    roof = roofline(args, device, str(model.dtype).replace("torch.", ""))
    print(_header(name, path, model, dims, roof, device, args), flush=True)
    pre = Preprocessor(processor, model.config.model_type)
    engines = {s: _engine(model, processor, s, args) for s in specs}
    runs = [r for bs in batch_sizes for r in _plan_runs(engines, pre, dims, bs, args, device)]
    _measure(runs, engines, args, device)
    if args.peak_tflops is None or args.mem_bw_gbs is None:  # again at the end: keep the quieter one
        again = roofline(args, device, str(model.dtype).replace("torch.", ""))
        roof = type(roof)(max(roof.flops_per_s, again.flops_per_s), max(roof.bytes_per_s, again.bytes_per_s))
        print(
            f"- roofline (best of the calibrations before and after): {roof.flops_per_s / 1e12:.2f} TFLOP/s, "
            f"{roof.bytes_per_s / 1e9:.1f} GB/s"
        )
    rows = [_row(run, engines[run.spec], prep, dims, roof, args.max_new_tokens) for run, prep in runs]
    _add_speedups(rows)
    print()
    print(table(rows))
    if args.pipeline:
        from hired_batch.bench.job_bench import run_pipeline

        run_pipeline([r for r in rows if r["batch_mode"] == "fixed"], path, args)
    _write(rows, args, f"hired-batch bench: {name}, {device}, {str(model.dtype).replace('torch.', '')}")
    return 0


def _plan_runs(engines, pre, dims, bs, args, device) -> list:
    """(Run, prepared items) per selector for one batch-size setting."""
    from hired_batch.engine.batching import auto_batch_size, memory_limit

    out = []
    limit = memory_limit(args.memory_limit, device) if bs == "auto" else None
    for spec, eng in engines.items():
        if bs == "auto":
            probe = [pre(im, q) for im, q in workload(len(SIZES))]
            batch = auto_batch_size(
                dims, [planned_tokens(eng, p) for p in probe], args.max_new_tokens, limit, vision_chunk=eng.vision_chunk
            )
            print(f"- auto batch for {spec.label}: {batch} (limit {limit / 1e9:.2f} GB)", flush=True)
        else:
            batch = bs
        prepared = [pre(im, q) for im, q in workload(n_items(args, batch))]
        run = Run(spec, batch, bs == "auto", plan_batches(eng, prepared, batch, args.order), [], [], [])
        out.append((run, prepared))
    return out


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


def _write(rows, args, title: str) -> None:
    if args.json:
        write_json(args.json, {"rows": rows})  # NaN (an undefined rate) as null: strict JSON readers refuse NaN
    if args.plot:
        plot(rows, args.plot, title)
