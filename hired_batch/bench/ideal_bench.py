"""``hired-batch bench --ideal-only``: the FLOP/byte model's prediction for a preset's shapes.

No weights are built or loaded: the preset's dimensions, the bench workload's token
counts, ``--memory-limit`` for the auto batch and a roofline you describe
(``--peak-tflops``, ``--mem-bw-gbs``) give items/s, time to first token and the
speedup of each selector over ``full``.
"""

from __future__ import annotations

from hired_batch.bench.workload import SIZES, fmt, speedups_over_full
from hired_batch.config import ConfigError


def run_ideal_only(args, specs, batch_sizes) -> int:
    """The FLOP/byte model's prediction for a preset's shapes, without weights."""
    from hired_batch.bench import ideal
    from hired_batch.bench.model_sizes import get_preset
    from hired_batch.engine.batching import auto_batch_size, copies_bytes, parse_bytes, worst_case
    from hired_batch.engine.dims import weight_bytes

    if args.model:
        raise ConfigError("--ideal-only takes a --preset (shapes without weights), not --model")
    preset = get_preset(args.preset or "scaled")
    bpp = {"float32": 4, "float16": 2, "bfloat16": 2}.get(args.dtype)
    dims = preset.dims(bpp)
    if args.peak_tflops is None or args.mem_bw_gbs is None:
        raise ConfigError("--ideal-only needs --peak-tflops and --mem-bw-gbs (the machine to model)")
    roof = ideal.Roofline(args.peak_tflops * 1e12, args.mem_bw_gbs * 1e9)
    n_text = 16  # "USER: <image>\n<question> ASSISTANT:" with a short question
    print(
        f"# ideal model: preset {preset.name}, {dims.bytes_per_param} bytes/param, "
        f"LM:vision {ideal.flop_ratio(dims):.1f}:1, roofline {args.peak_tflops} TFLOP/s {args.mem_bw_gbs} GB/s, "
        f"max_new_tokens {args.max_new_tokens}, images {SIZES}"
    )
    rows = []
    for bs_arg in batch_sizes:
        for spec in specs:
            probe = [ideal.item_tokens(dims, hw, spec.selection(args.mode), n_text) for hw in SIZES]
            bs = bs_arg
            if bs_arg == "auto":
                if args.memory_limit is None:
                    raise ConfigError("--ideal-only with --batch-sizes auto needs --memory-limit")
                try:
                    bs = auto_batch_size(
                        dims, probe, args.max_new_tokens, parse_bytes(args.memory_limit), vision_chunk=args.vision_chunk
                    )
                except ValueError as e:
                    print(f"- {spec.label}: {e}")
                    continue
            items = [probe[i % len(SIZES)] for i in range(max(bs, len(SIZES)))]
            batches = [items[i : i + bs] for i in range(0, len(items), bs)]
            t = ideal.workload_time(dims, batches, args.max_new_tokens, roof)
            first = ideal.batch_time(dims, batches[0], args.max_new_tokens, roof)
            peak = copies_bytes(dims, worst_case(dims, probe, args.max_new_tokens), bs, args.vision_chunk)
            rows.append(
                dict(
                    label=spec.label,
                    selector=spec.selector,
                    batch_size=bs,
                    auto=bs_arg == "auto",
                    est_mem=weight_bytes(dims) + peak,
                    items_per_s=len(items) / t,
                    ttft_s=first.vision_s + first.prefill_s,
                    visual=sum(i.n_visual for i in items) / len(items),
                )
            )
    print("| selector | batch | vis tok/item | est. memory GB | ideal items/s | ideal TTFT s | ideal speedup |")
    print("|---|---|---|---|---|---|---|")
    for r, sp in zip(rows, speedups_over_full(rows, "items_per_s", lambda r: r["auto"])):
        batch = f"{r['batch_size']} (auto)" if r["auto"] else r["batch_size"]
        print(
            f"| {r['label']} | {batch} | {r['visual']:.0f} | {r['est_mem'] / 1e9:.1f} | {r['items_per_s']:.3f} | "
            f"{r['ttft_s']:.2f} | {fmt(sp)} |"
        )
    return 0
