"""The engine comparison's results: one row per configuration and workload, the ratios
between rows, the Markdown table and header printed, the plot and the JSON written."""

from __future__ import annotations

import os
import statistics
import sys

from hired_batch.bench.compare_engines import Outcome
from hired_batch.bench.compare_flags import LENGTHS
from hired_batch.bench.workload import DRAWN_SHORTEST, SIZES, fmt, machine, speedups_over_full
from hired_batch.jsonio import write_json


def outcome_row(o: Outcome, dims, roof, batch: int, t_pre: float, limits: dict) -> dict:
    """One configuration on one workload: medians of its repeats, its token counts and the
    ideal model's items/s on the batches it ran (ratios are filled by ``add_ratios``)."""
    from hired_batch.bench import ideal
    from hired_batch.engine.dims import ItemTokens

    first = o.items[0]
    n = len(first)
    wall = statistics.median(o.walls)
    gen = [it["n_generated"] for rep in o.items for it in rep]
    full = o.config.spec.selector == "full"
    tokens = [
        ItemTokens(
            it["n_crops"], it["n_visual"], it["n_text"], n_projected=it["n_crops"] * dims.n_patches if full else None
        )
        for it in first
    ]
    # vLLM admits up to `batch` sequences at a time: the ideal sees it as consecutive batches
    plan = o.batches or [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    decoded = [it["n_decoded"] for rep in o.items for it in rep]
    decode_len = max(1, round(statistics.mean(decoded)))  # what ran: a static batch to its longest answer
    t_ideal = ideal.workload_time(dims, [[tokens[i] for i in idx] for idx in plan], decode_len, roof)
    ttft = [it["ttft_s"] for rep in o.items for it in rep if it["ttft_s"] is not None]
    return dict(
        workload=o.workload.name,
        engine=o.config.engine,
        selector=o.config.spec.selector,
        budget=o.config.spec.budget,
        label=o.config.label,
        batch_size=batch,
        items=n,
        repeats=len(o.walls),
        max_new_tokens=o.workload.max_new_tokens,
        lengths=o.workload.lengths,
        items_per_s=n / wall,
        items_per_s_best=n / min(o.walls),
        items_per_s_worst=n / max(o.walls),
        wall_s=o.walls,
        visual_tokens_per_item=statistics.mean(it["n_visual"] for it in first),
        generated_tokens_per_item=statistics.mean(gen),
        generated_tokens_min=min(gen),
        generated_tokens_max=max(gen),
        decoded_tokens_per_item=statistics.mean(decoded),
        output_tokens_per_s=sum(gen) / len(o.items) / wall,
        ttft_s=statistics.median(ttft) if ttft else None,
        ideal_items_per_s=n / t_ideal,
        ideal_decode_tokens=decode_len,
        preprocess_s_per_item=t_pre if o.config.engine == "hf" else None,  # outside the HF wall, inside vLLM's
        cpu_stall_share=statistics.median(o.stalls) if o.stalls else None,
        speedup=None,
        ideal_speedup=None,
        vs_stock_vllm=None,
        **(limits if o.config.engine == "vllm" else {}),  # the engine's max_model_len and KV-cache bytes
    )


def add_ratios(rows: list[dict]) -> None:
    """speedup / ideal_speedup over the same engine's full on the same workload; vs_stock_vllm."""
    for key in dict.fromkeys((r["workload"], r["engine"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["engine"]) == key]
        measured = speedups_over_full(group, "items_per_s", lambda r: False)
        predicted = speedups_over_full(group, "ideal_items_per_s", lambda r: False)
        for r, sp, isp in zip(group, measured, predicted):
            r["speedup"], r["ideal_speedup"] = sp, isp
    for r in rows:
        stock = [
            s for s in rows if s["workload"] == r["workload"] and s["engine"] == "vllm" and s["selector"] == "full"
        ]
        if stock:
            r["vs_stock_vllm"] = r["items_per_s"] / stock[0]["items_per_s"]


def table(rows: list[dict]) -> str:
    """The Markdown table printed on stdout."""
    head = (
        "| workload | engine, selector | batch | items/s | repeats: slowest-fastest | vis tok/item | "
        "gen tok/item (min-max) | decoded tok/item | TTFT s | output tok/s | speedup | ideal | measured/ideal | "
        "x stock vLLM | CPU stall % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None
        spread = "-" if r["repeats"] < 2 else f"{r['items_per_s_worst']:.3f}-{r['items_per_s_best']:.3f}"
        lines.append(
            f"| {r['workload']} | {r['label']} | {r['batch_size']} | {r['items_per_s']:.3f} | {spread} | "
            f"{r['visual_tokens_per_item']:.0f} | {r['generated_tokens_per_item']:.1f} "
            f"({r['generated_tokens_min']}-{r['generated_tokens_max']}) | {r['decoded_tokens_per_item']:.1f} | "
            f"{fmt(r['ttft_s'])} | "
            f"{r['output_tokens_per_s']:.1f} | {fmt(r['speedup'])} | {fmt(r['ideal_speedup'])} | {fmt(ratio)} | "
            f"{fmt(r['vs_stock_vllm'])} | {fmt(r['cpu_stall_share'] and 100 * r['cpu_stall_share'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def plot_figure(rows: list[dict], title: str):
    """One panel per workload: items/s per configuration, each bar labelled with its
    measured speedup over its engine's full and the ideal one (a matplotlib Figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["workload"] for r in rows))
    fig = Figure(figsize=(5 * len(names) + 1, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        rs = [r for r in rows if r["workload"] == name]
        x = range(len(rs))
        bars = ax.bar(x, [r["items_per_s"] for r in rs], color=["C0" if r["engine"] == "vllm" else "C1" for r in rs])
        for b, r in zip(bars, rs):
            ax.annotate(
                f"{fmt(r['speedup'])}x\n(ideal {fmt(r['ideal_speedup'])}x)",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(list(x), [r["label"].replace(" ", "\n", 1) for r in rs], fontsize=8)
        ax.set(ylabel="items/s (median of repeats)", title=f"{name} answers (max {rs[0]['max_new_tokens']} tokens)")
        ax.set_ylim(0, 1.25 * max(r["items_per_s"] for r in rs))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def header(name, path, device, dtype_name, dims, roof, batch, n, workloads, t_pre, args) -> str:
    """The Markdown lines printed before the engines start: model, machine, workloads, command."""
    import torch

    return "\n".join(
        [
            f"# hired-batch bench --engine {args.engine}: {name} ({path})",
            f"- machine: {machine(device)}",
            f"- HF engine: device {device}, dtype {dtype_name}, torch threads {torch.get_num_threads()}; "
            f"vLLM: its own platform and thread binding, same dtype",
            f"- roofline {roof.flops_per_s / 1e12:.2f} TFLOP/s, {roof.bytes_per_s / 1e9:.1f} GB/s",
            f"- {n} items per repeat, images {SIZES} (h, w), fresh images every repeat; batch / max_num_seqs {batch}; "
            f"{args.repeats} repeats (median), {args.warmup and 1} warm-up run",
            "- workloads: "
            + "; ".join(
                f"{w.name}: max_new_tokens {w.max_new_tokens} ({LENGTHS[w.lengths]}"
                f"{f' from [{DRAWN_SHORTEST}, {w.max_new_tokens}]' if w.lengths == 'drawn' else ''})"
                for w in workloads
            ),
            f"- preprocessing {t_pre * 1e3:.0f} ms per item (median): outside the HF rows' wall, inside vLLM's",
            f"- load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
            f"- command: hired-batch {' '.join(sys.argv[1:])}",
        ]
    )


def write_outputs(rows, args, title: str) -> None:
    """The rows as JSON (``--json``) and the plot as PNG (``--plot``), where asked for."""
    if args.json:
        write_json(args.json, {"rows": rows})  # NaN (an undefined rate) as null
    if args.plot:
        plot_figure(rows, title).savefig(args.plot, dpi=100)
