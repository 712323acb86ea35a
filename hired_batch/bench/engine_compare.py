"""``hired-batch bench --engine hf,vllm``: the same items through each engine and selector.

Four configurations from ``--engine hf,vllm --selectors full,hired:0.2``: stock vLLM
``full`` (vLLM's own LLaVA-NeXT architecture, no plugin: the peer a user would otherwise
run), vLLM with the HiRED plugin, our HF engine ``full`` and HF with HiRED; on two
workloads: ``short`` answers (VQA prompts, ``--max-new-tokens``, default 8, every item
decodes that many) and ``long``, uneven answers (caption prompts, at most
``--long-new-tokens``, default 64: where continuous batching matters). A real checkpoint's
long answers stop at EOS; random weights never emit EOS, so on a preset each item's
length is drawn (``workload.answer_lengths``) and forced, as if EOS came there
(``--long-lengths``).

How each engine runs (docs/performance.md, "HF engine vs vLLM"):
- vLLM: its offline ``LLM.generate`` over all items of a repeat at once, so it batches
  continuously (at most ``--batch-sizes`` sequences at a time); every repeat has fresh
  images (no multimodal-cache hit), and prefix caching and the processor cache are off.
  Its wall time includes vLLM's own image processing; the HF rows' does not (done
  once beforehand, as in the plain bench), which ``preprocess_s_per_item`` quantifies.
- HF: ``HiredEngine.generate_prepared`` over batches of ``--batch-sizes`` items grouped
  by prompt length, like the plain bench; a static batch decodes until its longest
  answer ends (``decoded tok/item``), whatever its shorter answers need.
- Repeats interleave across all configurations and workloads (repeat 1 of each, then
  repeat 2, ...); every configuration of a repeat sees the same images and prompt ids.

Rows: ``speedup`` is items/s over the same engine's ``full`` on the same workload,
``ideal_speedup`` the FLOP/byte model's ratio on the token counts that ran (decode
length: each row's mean decoded tokens), ``vs_stock_vllm`` items/s over stock vLLM
``full`` on the same workload.

With ``--pipeline``, the vLLM + HiRED rows' short-workload items also go through the Ray
job with ``--engine vllm`` and the same engine settings (``job_bench``), after the bare
engines have stopped: the job's steady items/s against the bare engine's.

Flags: ``compare_flags``; engines and repeats: ``compare_engines``; rows, table, plot and
JSON: ``compare_report``; this module runs them.
"""

from __future__ import annotations

import os
import statistics
import time

from hired_batch.bench.compare_engines import (
    Config,
    Outcome,
    hf_repeat,
    start_engine,
    stop_engine,
    vllm_limits,
    vllm_repeat,
)
from hired_batch.bench.compare_flags import Workload, check_args
from hired_batch.bench.compare_report import add_ratios, header, outcome_row, table, write_outputs
from hired_batch.bench.workload import answer_lengths, n_items, resolve_model, roofline, workload
from hired_batch.config import ModelConfig

WARMUP_SEED = 10_000  # warm-up images: never the timed ones (seeds 1..repeats)


def run_compare(args) -> int:
    """``bench --engine ...vllm``: every configuration, both workloads, one process."""
    engines, specs, batch, workloads = check_args(args)
    import torch

    from hired_batch.engine.dims import ModelDims, bytes_per_param
    from hired_batch.engine.weights import Preprocessor, load_llava

    path, name = resolve_model(args)
    model = processor = None
    if "hf" in engines:
        model, processor = load_llava(ModelConfig(path=path, dtype=args.dtype, device=args.device))
        pre = Preprocessor(processor, model.config.model_type)
        hf_config, device, dtype = model.config, str(next(model.parameters()).device), model.dtype
    else:
        from transformers import AutoConfig

        from hired_batch.engine.weights import resolve_device, resolve_dtype  # the one dtype default

        pre = Preprocessor.from_pretrained(path)
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        dev = resolve_device(args.device)
        device, dtype = str(dev), resolve_dtype(args.dtype, dev)
    dtype_name = str(dtype).replace("torch.", "")
    dims = ModelDims.from_hf(hf_config, bytes_per_param=bytes_per_param(dtype))
    roof = roofline(args, device, dtype_name)
    n = n_items(args, batch)
    # Inputs per (workload, repeat): fresh images each repeat; repeat 0 is the warm-up.
    inputs = {
        w.name: [_inputs(pre, n if r else batch, w, WARMUP_SEED if r == 0 else r) for r in range(args.repeats + 1)]
        for w in workloads
    }
    t_pre = statistics.median(m["t_preprocess_s"] for w in inputs.values() for rep in w[1:] for _, _, m in rep)
    threads = torch.get_num_threads()
    configs = [Config(e, s) for e in engines for s in specs]
    limits = vllm_limits(pre, hf_config, workloads, dims, batch)
    print(header(name, path, device, dtype_name, dims, roof, batch, n, workloads, t_pre, args), flush=True)
    runners = {}
    try:
        for c in configs:
            runners[c] = start_engine(c, path, model, processor, hf_config, limits, dtype_name, batch, device, args)
        torch.set_num_threads(threads)  # in case starting vLLM changed this process's threads
        outcomes = _measure(configs, runners, workloads, inputs, batch, args)
    finally:
        for c, r in runners.items():
            stop_engine(c, r)
    if args.peak_tflops is None or args.mem_bw_gbs is None:
        again = roofline(args, device, dtype_name)
        roof = type(roof)(max(roof.flops_per_s, again.flops_per_s), max(roof.bytes_per_s, again.bytes_per_s))
    rows = [outcome_row(o, dims, roof, batch, t_pre, limits) for o in outcomes]
    add_ratios(rows)
    print(f"- load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print(table(rows))
    if args.pipeline:
        from hired_batch.bench.job_bench import run_pipeline

        run_pipeline(pipeline_rows(rows), path, args)
    write_outputs(rows, args, f"hired-batch bench --engine {args.engine}: {name}, {dtype_name}, batch {batch}")
    return 0


def pipeline_rows(rows: list[dict]) -> list[dict]:
    """The rows ``--pipeline`` runs through the Ray job: vLLM + HiRED on the short workload
    (the job always runs the plugin, so stock vLLM ``full`` has no job counterpart)."""
    return [r for r in rows if r["engine"] == "vllm" and r["selector"] != "full" and r["workload"] == "short"]


def _inputs(pre, n: int, work: Workload, seed: int) -> list:
    """n (HF engine's prepared item, vLLM request, meta) triples: the same image and prompt ids
    for both engines; meta holds the crops, text tokens, preprocessing seconds and the drawn
    answer length (None unless the workload draws them)."""
    out = []
    drawn = answer_lengths(n, seed, work.max_new_tokens) if work.lengths == "drawn" else [None] * n
    for (image, question), answer_len in zip(workload(n, seed=seed, questions=work.questions), drawn):
        t0 = time.perf_counter()
        p = pre(image, question)
        meta = dict(
            n_crops=int(p.pixel_values.shape[0]),
            n_text=len(p.input_ids) - 1,
            t_preprocess_s=time.perf_counter() - t0,
            answer_len=answer_len,
        )
        request = {"prompt_token_ids": p.input_ids.tolist(), "multi_modal_data": {"image": image}}
        out.append((p, request, meta))
    return out


def _measure(configs, runners, workloads, inputs, batch, args) -> list[Outcome]:
    """Warm up each configuration, then interleave the timed repeats."""
    outcomes = {(c, w.name): Outcome(c, w) for w in workloads for c in configs}  # rows: by workload
    for rep in range(args.repeats + 1):  # 0: warm-up (args.warmup > 0), untimed
        if rep == 0 and args.warmup == 0:
            continue
        for w in workloads:
            for c in configs:
                o, data = outcomes[(c, w.name)], inputs[w.name][rep]
                if c.engine == "vllm":
                    vllm_repeat(runners[c], [(r, m) for _, r, m in data], w, o, keep=rep > 0)
                else:
                    hf_repeat(runners[c], [(p, m) for p, _, m in data], batch, w, o, keep=rep > 0)
                if rep:
                    print(f"  {w.name} {c.label} repeat {rep}: {o.walls[-1]:.2f} s", flush=True)
    return list(outcomes.values())
