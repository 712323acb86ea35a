"""The engines of the comparison and one timed repeat through each: vLLM's offline engine
(stock for ``full``, the HiRED plugin otherwise) started and stopped, the HF engine per
decode limit, and what a repeat records (``Outcome``)."""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass, field

from hired_batch.bench.compare_flags import Workload
from hired_batch.bench.model_sizes import default_cache_dir
from hired_batch.bench.workload import CAPTIONS, QUESTIONS, SIZES, Spec, cpu_stall_us, plan_batches
from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.vllm import stock_checkpoint


def stock_cache_dir() -> pathlib.Path:
    """Where stock vLLM's copies of checkpoints with hub CLIP names are built: beside the
    presets (``~/.cache/hired_batch/vllm-stock``, or under $HIRED_BATCH_CACHE)."""
    return default_cache_dir().parent / "vllm-stock"


@dataclass(frozen=True)
class Config:
    """One engine with one selector setting."""

    engine: str  # hf | vllm
    spec: Spec  # selector and budget

    @property
    def label(self) -> str:
        if self.engine == "vllm" and self.spec.selector == "full":
            return "vllm full (stock)"
        return f"{self.engine} {self.spec.label}"


@dataclass
class Outcome:
    """What one configuration measured on one workload, per repeat."""

    config: Config
    workload: Workload
    walls: list = field(default_factory=list)  # seconds per repeat
    stalls: list = field(default_factory=list)  # share of the wall some task waited for a CPU
    items: list = field(default_factory=list)  # per repeat: dicts n_crops, n_visual, n_text, n_generated
    #   (the answer's tokens), n_decoded (decode steps the engine ran for it), ttft_s
    batches: list = field(default_factory=list)  # first repeat: lists of item indices as run (ideal model)


def start_engine(c: Config, path, model, processor, hf_config, limits: dict, dtype_name, batch, device, args):
    """The HF engines of one selector, or a started vLLM engine."""
    if c.engine == "hf":
        return HfEngines(model, processor, c.spec, args)
    max_len, kv = limits["max_model_len"], limits["kv_cache_bytes"]
    src = stock_checkpoint(path, stock_cache_dir()) if c.spec.selector == "full" else path
    print(
        f"- starting vLLM for {c.label} ({src}): max_model_len {max_len}, max_num_seqs {batch}, "
        f"KV cache {kv / 1e9:.2f} GB",
        flush=True,
    )
    t0 = time.perf_counter()
    llm = start_vllm(src, c.spec, hf_config.model_type, dtype_name, batch, max_len, kv, device == "cpu")
    print(f"  started in {time.perf_counter() - t0:.0f} s", flush=True)
    return llm


def vllm_limits(pre, hf_config, workloads, dims, batch: int) -> dict:
    """vLLM's ``max_model_len`` (the longest full-token prompt + the longest answer, rounded
    up to 256) and KV-cache bytes (``batch`` such sequences: no preemption)."""
    from hired_batch.engine.dims import kv_bytes_per_token

    max_len = _longest_prompt(pre, hf_config) + max(w.max_new_tokens for w in workloads)
    max_len = -(-max_len // 256) * 256
    return dict(max_model_len=max_len, kv_cache_bytes=batch * max_len * kv_bytes_per_token(dims))


def _longest_prompt(pre, hf_config) -> int:
    """Tokens of the longest prompt any workload item can have: every visual token (full)."""
    from hired_batch.engine.token_plan import Geometry, visual_tokens

    geo = Geometry.from_config(hf_config)
    text = max(len(pre.tokenizer(pre.prompt(q))["input_ids"]) for q in QUESTIONS + CAPTIONS)
    return max(visual_tokens(tuple(hw), SelectionConfig(selector="full"), geo) for hw in SIZES) + text


# --------------------------------------------------------------------------- vLLM


def start_vllm(
    path: str, spec: Spec, model_type: str, dtype: str, batch: int, max_model_len: int, kv_bytes: int, on_cpu: bool
):
    """vLLM's offline engine for one selector: vLLM's own architecture for ``full`` (stock,
    no plugin override), the plugin's HiRED architecture otherwise.

    The engine arguments are the job's (``engine_kwargs``: batch size as ``max_num_seqs``,
    the KV-cache budget, dtype, eager on CPU); the bench adds only what makes repeats
    measure the work and not a cache hit: prefix caching and the multimodal processor
    cache off.
    """
    from vllm import LLM

    from hired_batch.engine.vllm.options import engine_kwargs

    kw = engine_kwargs(
        ModelConfig(path=path, dtype=dtype, max_model_len=max_model_len),
        spec.selection("exact"),
        model_type=model_type,
        batch_size=batch,
        memory_limit=kv_bytes,
        gpu=not on_cpu,
    )
    if spec.selector == "full":
        kw["hf_overrides"] = {}  # the peer: stock vLLM, not our plugin at full budget
    if not on_cpu:  # vLLM refuses to start unless free memory >= utilization x total; the HF model and
        import torch  # the other engine already hold some, so it checks against what is free now

        free, total = torch.cuda.mem_get_info()
        kw["gpu_memory_utilization"] = round(0.9 * free / total, 3)
    # the bench asks the same images again: no cache may serve a timed call
    return LLM(**{**kw, "enable_prefix_caching": False}, mm_processor_cache_gb=0)


def stop_vllm(llm) -> None:
    """Shut a started vLLM engine's core down (its processes and memory)."""
    llm.llm_engine.engine_core.shutdown()


def stop_engine(c: Config, runner) -> None:
    """Release what ``start_engine`` started: a vLLM engine stops; the HF engines share the
    process's model and need nothing."""
    if c.engine == "vllm":
        stop_vllm(runner)


def vllm_repeat(llm, requests, work: Workload, out: Outcome, keep: bool) -> None:
    """One timed ``generate`` over all items; per-item counts and first-token times from vLLM."""
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=hi, min_tokens=lo, temperature=0.0)
        for hi, lo in (work.limits(meta["answer_len"]) for _, meta in requests)
    ]
    stall0, t0 = cpu_stall_us(), time.perf_counter()
    outs = llm.generate([r for r, _ in requests], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    if not keep:
        return
    _record(out, wall, stall0)
    items = []
    for o, (_, meta) in zip(outs, requests):
        m = o.metrics
        n_generated = len(o.outputs[0].token_ids)
        items.append(
            dict(
                meta,
                n_visual=len(o.prompt_token_ids) - meta["n_text"],
                n_generated=n_generated,
                n_decoded=n_generated,
                ttft_s=getattr(m, "first_token_latency", None),
            )
        )
    out.items.append(items)


def _record(out: Outcome, wall: float, stall0) -> None:
    out.walls.append(wall)
    stall1 = cpu_stall_us()
    if stall0 is not None and stall1 is not None:
        out.stalls.append((stall1 - stall0) / 1e6 / wall)


# --------------------------------------------------------------------------- HF


class HfEngines:
    """The HF engine of one selector, per (max, min) new tokens: a static batch decodes to
    the longest answer it may hold, so each batch takes the engine of its items' limits."""

    def __init__(self, model, processor, spec: Spec, args):
        self.model, self.processor, self.spec, self.args = model, processor, spec, args
        self._engines = {}

    def get(self, max_new: int, min_new: int):
        """The engine decoding at most max_new and at least min_new tokens (built once)."""
        from hired_batch.engine.hf import HiredEngine

        key = (max_new, min_new)
        if key not in self._engines:
            gen = GenerationConfig(max_new_tokens=max_new, min_new_tokens=min_new)
            self._engines[key] = HiredEngine(
                self.model,
                self.processor,
                self.spec.selection(self.args.mode),
                gen,
                vision_chunk=self.args.vision_chunk,
            )
        return self._engines[key]


def hf_repeat(engines: HfEngines, prepared, batch: int, work: Workload, out: Outcome, keep: bool) -> None:
    """The items in batches grouped by planned prompt length, as the plain bench runs them;
    each batch decodes to its longest item's limit (answer lengths do not group batches:
    an engine cannot know them before it decodes)."""
    limits = [work.limits(meta["answer_len"]) for _, meta in prepared]
    plan = plan_batches(engines.get(*limits[0]), [p for p, _ in prepared], batch, "grouped")
    runs = [(idx, engines.get(max(limits[i][0] for i in idx), max(limits[i][1] for i in idx))) for idx in plan]
    stall0, t0 = cpu_stall_us(), time.perf_counter()
    results = [engine.generate_prepared([prepared[i][0] for i in idx]) for idx, engine in runs]
    wall = time.perf_counter() - t0
    if not keep:
        return
    _record(out, wall, stall0)
    items, clock = {}, 0.0
    for idx, r in zip(plan, results):
        first = clock + r.t_vision_s + r.t_prefill_s  # every item of a batch: since the repeat began
        decoded = max(it["n_generated_tokens"] for it in r.items)  # the batch ran until its longest answer ended
        for i, it in zip(idx, r.items):
            answer = min(it["n_generated_tokens"], limits[i][0])  # a drawn length ends the answer there
            items[i] = dict(
                prepared[i][1], n_visual=it["n_visual_tokens_kept"], n_generated=answer, n_decoded=decoded, ttft_s=first
            )
        clock += r.t_vision_s + r.t_prefill_s + r.t_decode_s
    out.items.append([items[i] for i in range(len(prepared))])
    if not out.batches:
        out.batches = plan
