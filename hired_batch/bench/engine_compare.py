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
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from hired_batch.bench.workload import (
    CAPTIONS,
    DRAWN_SHORTEST,
    QUESTIONS,
    SIZES,
    Spec,
    answer_lengths,
    cpu_stall_us,
    fmt,
    machine,
    n_items,
    parse_selectors,
    plan_batches,
    resolve_model,
    roofline,
    speedups_over_full,
    workload,
)
from hired_batch.config import ENGINES, ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.jsonio import write_json

DEFAULT_LONG_NEW_TOKENS = 64
# Defaults of the engine comparison, and the smaller ones --quick uses (a flag given explicitly wins).
COMPARE_DEFAULTS = dict(selectors="full,hired:0.2", batch_sizes="4", repeats=3, workloads="short,long")
COMPARE_QUICK = dict(selectors="full,hired:0.2", batch_sizes="2", repeats=1, workloads="short,long")
# How the answers of a workload end (Workload.lengths); --long-lengths picks the long workload's.
LENGTHS = {"fixed": "EOS suppressed", "eos": "stop at EOS", "drawn": "drawn lengths, forced"}
WARMUP_SEED = 10_000  # warm-up images: never the timed ones (seeds 1..repeats)


@dataclass(frozen=True)
class Workload:
    """One kind of request of the comparison."""

    name: str  # short | long
    questions: tuple  # prompts cycled over the items
    max_new_tokens: int  # decode budget per item (drawn lengths: the longest one drawn)
    lengths: str  # fixed: EOS suppressed, every item decodes max_new_tokens; eos: each answer stops at
    #   EOS; drawn: each item's length drawn from [DRAWN_SHORTEST, max_new_tokens] and forced (EOS at it)

    def limits(self, answer_len: int | None) -> tuple[int, int]:
        """(max, min) new tokens of one item of this workload (answer_len: its drawn length)."""
        if self.lengths == "drawn":
            return answer_len, answer_len
        return self.max_new_tokens, self.max_new_tokens if self.lengths == "fixed" else 0


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


# --------------------------------------------------------------------------- flags


def add_flags(p) -> None:
    """The comparison's own flags (``bench`` adds them next to its own)."""
    p.add_argument("--engine", default="hf",
                   help="comma list of generation engines, hf and/or vllm (default hf: the selector sweep). "
                        "With vllm: stock vLLM for 'full', the HiRED plugin otherwise, the same items through "
                        "every engine x selector on two workloads (needs vllm installed)")
    p.add_argument("--workloads", help="with --engine ...vllm: comma list of short (VQA, --max-new-tokens, "
                                       "fixed length) and long (captions, at most --long-new-tokens, uneven); "
                                       f"default {COMPARE_DEFAULTS['workloads']}")
    p.add_argument("--long-new-tokens", type=int,
                   help=f"the long workload's max new tokens (default {DEFAULT_LONG_NEW_TOKENS}, no minimum)")
    p.add_argument("--long-lengths", choices=("eos", "drawn"),
                   help="how the long workload's answers end: eos (a real checkpoint's own EOS; default with "
                        "--model) or drawn (each item's length drawn uniformly from "
                        f"[{DRAWN_SHORTEST}, --long-new-tokens] and forced; default with a preset, whose random "
                        "weights never emit EOS)")


def parse_engines(text: str) -> list[str]:
    """'hf,vllm' -> ['hf', 'vllm'] (order kept, no repeats)."""
    out = list(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    bad = [e for e in out if e not in ENGINES]
    if bad or not out:
        raise ConfigError(f"--engine: expected a comma list of {ENGINES}, got {text!r}")
    return out


def compares(args) -> bool:
    """True when ``bench`` runs the engine comparison (``--engine`` names vllm); with the
    HF engine alone the plain sweep runs, which refuses the comparison's own flags."""
    if "vllm" in parse_engines(args.engine):
        return True
    for flag, value in (("--workloads", args.workloads), ("--long-new-tokens", args.long_new_tokens),
                        ("--long-lengths", args.long_lengths)):
        if value is not None:
            raise ConfigError(f"{flag} belongs to the engine comparison: add --engine hf,vllm (or vllm)")
    return False


def check_args(args) -> tuple[list[str], list[Spec], int, list[Workload]]:
    """(engines, specs, batch size, workloads) of a comparison; ConfigError on a bad flag.

    Every flag is checked before vLLM's presence, so a typo is named even where vLLM
    is missing; nothing is loaded here.
    """
    engines = parse_engines(args.engine)
    defaults = COMPARE_QUICK if args.quick else COMPARE_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    specs = parse_selectors(args.selectors)
    sizes = [s.strip() for s in args.batch_sizes.split(",") if s.strip()]
    if len(sizes) != 1 or not sizes[0].isdigit() or int(sizes[0]) < 1:
        raise ConfigError(f"--batch-sizes: --engine {args.engine} takes one batch size, an int >= 1 (vLLM's "
                          f"concurrent sequences, the HF engine's batch), got {args.batch_sizes!r}")
    if args.ideal_only:
        raise ConfigError(f"--ideal-only is not available with --engine {args.engine}; use --engine hf")
    if args.mode != "exact":
        raise ConfigError(f"--mode {args.mode}: the vLLM plugin runs exact mode only (reference mode's token "
                          "count depends on the attention, vLLM places placeholders first)")
    if args.long_new_tokens is None:
        args.long_new_tokens = DEFAULT_LONG_NEW_TOKENS
    if args.long_lengths is None:
        args.long_lengths = "eos" if args.model else "drawn"
    for name in ("max_new_tokens", "long_new_tokens", "repeats", "vision_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.items is not None and args.items < 1:
        raise ConfigError(f"--items must be >= 1, got {args.items}")
    workloads = parse_workloads(args)
    if args.pipeline and not (any(s.selector != "full" for s in specs) and "short" in [w.name for w in workloads]):
        raise ConfigError("--pipeline with --engine vllm runs the vLLM + HiRED rows of the short workload through "
                          f"the Ray job: it needs a HiRED selector and the short workload, got --selectors "
                          f"{args.selectors} --workloads {args.workloads}")
    from hired_batch.engine.vllm import check_installed

    check_installed()  # one line naming the extras, before any model loads
    return engines, specs, int(sizes[0]), workloads


def parse_workloads(args) -> list[Workload]:
    """--workloads -> Workloads (short: VQA, fixed length; long: captions, --long-lengths)."""
    known = {"short": Workload("short", tuple(QUESTIONS), args.max_new_tokens, "fixed"),
             "long": Workload("long", tuple(CAPTIONS), args.long_new_tokens, args.long_lengths)}
    names = list(dict.fromkeys(p.strip() for p in args.workloads.split(",") if p.strip()))
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"--workloads: expected a comma list of {sorted(known)}, got {args.workloads!r}")
    return [known[n] for n in names]


# --------------------------------------------------------------------------- vLLM


def _start_vllm(path: str, spec: Spec, model_type: str, dtype: str, batch: int, max_model_len: int,
                kv_bytes: int, on_cpu: bool):
    """vLLM's offline engine for one selector: vLLM's own architecture for ``full`` (stock,
    no plugin override), the plugin's HiRED architecture otherwise.

    The engine arguments are the job's (``engine_kwargs``: batch size as ``max_num_seqs``,
    the KV-cache budget, dtype, eager on CPU); the bench adds only what makes repeats
    measure the work and not a cache hit: prefix caching and the multimodal processor
    cache off.
    """
    from vllm import LLM

    from hired_batch.engine.vllm.options import engine_kwargs

    kw = engine_kwargs(ModelConfig(path=path, dtype=dtype, max_model_len=max_model_len), spec.selection("exact"),
                       model_type=model_type, batch_size=batch, memory_limit=kv_bytes, gpu=not on_cpu)
    if spec.selector == "full":
        kw["hf_overrides"] = {}  # the peer: stock vLLM, not our plugin at full budget
    if not on_cpu:  # vLLM refuses to start unless free memory >= utilization x total; the HF model and
        import torch  # the other engine already hold some, so it checks against what is free now

        free, total = torch.cuda.mem_get_info()
        kw["gpu_memory_utilization"] = round(0.9 * free / total, 3)
    return LLM(**kw, enable_prefix_caching=False, mm_processor_cache_gb=0)


def _stop_vllm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def stock_checkpoint(path: str, cache_root=None) -> str:
    """``path`` with CLIP weights named as hub checkpoints name them, which stock vLLM 0.32
    loads (it cannot load the ``vision_tower.embeddings...`` names transformers 5 saves,
    which our presets and tiny checkpoints have; the plugin maps both). ``path`` itself
    when it has no such names; else a renamed copy, built once under the cache."""
    import hashlib
    import pathlib
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = pathlib.Path(path)
    files = sorted(src.glob("*.safetensors"))
    if not src.is_dir() or not files:
        return path  # a hub id or other layout: vLLM loads it as is
    from hired_batch.engine.vllm import hub_clip_name as renamed

    keys = [k for f in files for k in safe_open(str(f), "pt").keys()]
    if all(renamed(k) == k for k in keys):
        return path
    from hired_batch.bench.model_sizes import default_cache_dir

    root = pathlib.Path(cache_root) if cache_root else default_cache_dir().parent / "vllm-stock"
    stamp = f"{src.resolve()}:{max(f.stat().st_mtime_ns for f in files)}"
    out = root / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    if (out / "done").is_file():
        return str(out)
    tmp = root / f".{out.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    for f in files:
        with safe_open(str(f), "pt") as s:
            save_file({renamed(k): s.get_tensor(k) for k in s.keys()}, tmp / f.name, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        (tmp / index.name).write_text(json.dumps(data, indent=1))
    (tmp / "done").write_text(str(src.resolve()))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def _vllm_repeat(llm, requests, work: Workload, out: Outcome, keep: bool) -> None:
    """One timed ``generate`` over all items; per-item counts and first-token times from vLLM."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=hi, min_tokens=lo, temperature=0.0)
              for hi, lo in (work.limits(meta["answer_len"]) for _, meta in requests)]
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
        items.append(dict(meta, n_visual=len(o.prompt_token_ids) - meta["n_text"], n_generated=n_generated,
                          n_decoded=n_generated, ttft_s=getattr(m, "first_token_latency", None)))
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
            self._engines[key] = HiredEngine(self.model, self.processor, self.spec.selection(self.args.mode), gen,
                                             vision_chunk=self.args.vision_chunk)
        return self._engines[key]


def _hf_repeat(engines: HfEngines, prepared, batch: int, work: Workload, out: Outcome, keep: bool) -> None:
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
            items[i] = dict(prepared[i][1], n_visual=it["n_visual_tokens_kept"], n_generated=answer,
                            n_decoded=decoded, ttft_s=first)
        clock += r.t_vision_s + r.t_prefill_s + r.t_decode_s
    out.items.append([items[i] for i in range(len(prepared))])
    if not out.batches:
        out.batches = plan


# --------------------------------------------------------------------------- main flow


def run_compare(args) -> int:
    """``bench --engine ...vllm``: every configuration, both workloads, one process."""
    engines, specs, batch, workloads = check_args(args)
    import torch

    from hired_batch.engine.checkpoint import Preprocessor, load_llava
    from hired_batch.engine.dims import ModelDims, bytes_per_param

    path, name = resolve_model(args)
    model = processor = None
    if "hf" in engines:
        model, processor = load_llava(ModelConfig(path=path, dtype=args.dtype, device=args.device))
        pre = Preprocessor(processor, model.config.model_type)
        hf_config, device, dtype = model.config, str(next(model.parameters()).device), model.dtype
    else:
        from transformers import AutoConfig

        from hired_batch.engine.checkpoint import resolve_device, resolve_dtype  # the one dtype default

        pre = Preprocessor.from_pretrained(path)
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        dev = resolve_device(args.device)
        device, dtype = str(dev), resolve_dtype(args.dtype, dev)
    dtype_name = str(dtype).replace("torch.", "")
    dims = ModelDims.from_hf(hf_config, bytes_per_param=bytes_per_param(dtype))
    roof = roofline(args, device, dtype_name)
    n = n_items(args, batch)
    # Inputs per (workload, repeat): fresh images each repeat; repeat 0 is the warm-up.
    inputs = {w.name: [_inputs(pre, n if r else batch, w, WARMUP_SEED if r == 0 else r)
                       for r in range(args.repeats + 1)] for w in workloads}
    t_pre = statistics.median(m["t_preprocess_s"] for w in inputs.values() for rep in w[1:] for _, _, m in rep)
    threads = torch.get_num_threads()
    configs = [Config(e, s) for e in engines for s in specs]
    limits = _vllm_limits(pre, hf_config, workloads, dims, batch)
    print(_header(name, path, device, dtype_name, dims, roof, batch, n, workloads, t_pre, args), flush=True)
    runners = {}
    try:
        for c in configs:
            runners[c] = _runner(c, path, model, processor, hf_config, limits, dtype_name, batch, device, args)
        torch.set_num_threads(threads)  # in case starting vLLM changed this process's threads
        outcomes = _measure(configs, runners, workloads, inputs, batch, args)
    finally:
        for c, r in runners.items():
            if c.engine == "vllm":
                _stop_vllm(r)
    if args.peak_tflops is None or args.mem_bw_gbs is None:
        again = roofline(args, device, dtype_name)
        roof = type(roof)(max(roof.flops_per_s, again.flops_per_s), max(roof.bytes_per_s, again.bytes_per_s))
    rows = [_row(o, dims, roof, batch, t_pre, limits) for o in outcomes]
    add_ratios(rows)
    print(f"- load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print(table(rows))
    if args.pipeline:
        from hired_batch.bench.job_bench import run_pipeline

        run_pipeline(pipeline_rows(rows), path, args)
    _write(rows, args, f"hired-batch bench --engine {args.engine}: {name}, {dtype_name}, batch {batch}")
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
        meta = dict(n_crops=int(p.pixel_values.shape[0]), n_text=len(p.input_ids) - 1,
                    t_preprocess_s=time.perf_counter() - t0, answer_len=answer_len)
        request = {"prompt_token_ids": p.input_ids.tolist(), "multi_modal_data": {"image": image}}
        out.append((p, request, meta))
    return out


def _vllm_limits(pre, hf_config, workloads, dims, batch: int) -> dict:
    """vLLM's ``max_model_len`` (the longest full-token prompt + the longest answer, rounded
    up to 256) and KV-cache bytes (``batch`` such sequences: no preemption)."""
    from hired_batch.engine.dims import kv_bytes_per_token

    max_len = _longest_prompt(pre, hf_config) + max(w.max_new_tokens for w in workloads)
    max_len = -(-max_len // 256) * 256
    return dict(max_model_len=max_len, kv_cache_bytes=batch * max_len * kv_bytes_per_token(dims))


def _runner(c: Config, path, model, processor, hf_config, limits: dict, dtype_name, batch, device, args):
    """The HF engines of one selector, or a started vLLM engine."""
    if c.engine == "hf":
        return HfEngines(model, processor, c.spec, args)
    max_len, kv = limits["max_model_len"], limits["kv_cache_bytes"]
    src = stock_checkpoint(path) if c.spec.selector == "full" else path
    print(f"- starting vLLM for {c.label} ({src}): max_model_len {max_len}, max_num_seqs {batch}, "
          f"KV cache {kv / 1e9:.2f} GB", flush=True)
    t0 = time.perf_counter()
    llm = _start_vllm(src, c.spec, hf_config.model_type, dtype_name, batch, max_len, kv, device == "cpu")
    print(f"  started in {time.perf_counter() - t0:.0f} s", flush=True)
    return llm


def _longest_prompt(pre, hf_config) -> int:
    """Tokens of the longest prompt any workload item can have: every visual token (full)."""
    from hired_batch.engine.token_plan import Geometry, visual_tokens

    geo = Geometry.from_config(hf_config)
    text = max(len(pre.tokenizer(pre.prompt(q))["input_ids"]) for q in QUESTIONS + CAPTIONS)
    return max(visual_tokens(tuple(hw), SelectionConfig(selector="full"), geo) for hw in SIZES) + text


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
                    _vllm_repeat(runners[c], [(r, m) for _, r, m in data], w, o, keep=rep > 0)
                else:
                    _hf_repeat(runners[c], [(p, m) for p, _, m in data], batch, w, o, keep=rep > 0)
                if rep:
                    print(f"  {w.name} {c.label} repeat {rep}: {o.walls[-1]:.2f} s", flush=True)
    return list(outcomes.values())


# --------------------------------------------------------------------------- rows


def _row(o: Outcome, dims, roof, batch: int, t_pre: float, limits: dict) -> dict:
    from hired_batch.bench import ideal
    from hired_batch.engine.dims import ItemTokens

    first = o.items[0]
    n = len(first)
    wall = statistics.median(o.walls)
    gen = [it["n_generated"] for rep in o.items for it in rep]
    full = o.config.spec.selector == "full"
    tokens = [ItemTokens(it["n_crops"], it["n_visual"], it["n_text"],
                         n_projected=it["n_crops"] * dims.n_patches if full else None) for it in first]
    # vLLM admits up to `batch` sequences at a time: the ideal sees it as consecutive batches
    plan = o.batches or [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    decoded = [it["n_decoded"] for rep in o.items for it in rep]
    decode_len = max(1, round(statistics.mean(decoded)))  # what ran: a static batch to its longest answer
    t_ideal = ideal.workload_time(dims, [[tokens[i] for i in idx] for idx in plan], decode_len, roof)
    ttft = [it["ttft_s"] for rep in o.items for it in rep if it["ttft_s"] is not None]
    return dict(
        workload=o.workload.name, engine=o.config.engine, selector=o.config.spec.selector,
        budget=o.config.spec.budget, label=o.config.label, batch_size=batch, items=n, repeats=len(o.walls),
        max_new_tokens=o.workload.max_new_tokens, lengths=o.workload.lengths,
        items_per_s=n / wall, items_per_s_best=n / min(o.walls), items_per_s_worst=n / max(o.walls),
        wall_s=o.walls, visual_tokens_per_item=statistics.mean(it["n_visual"] for it in first),
        generated_tokens_per_item=statistics.mean(gen), generated_tokens_min=min(gen), generated_tokens_max=max(gen),
        decoded_tokens_per_item=statistics.mean(decoded),
        output_tokens_per_s=sum(gen) / len(o.items) / wall,
        ttft_s=statistics.median(ttft) if ttft else None,
        ideal_items_per_s=n / t_ideal, ideal_decode_tokens=decode_len,
        preprocess_s_per_item=t_pre if o.config.engine == "hf" else None,  # outside the HF wall, inside vLLM's
        cpu_stall_share=statistics.median(o.stalls) if o.stalls else None,
        speedup=None, ideal_speedup=None, vs_stock_vllm=None,
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
        stock = [s for s in rows if s["workload"] == r["workload"] and s["engine"] == "vllm" and s["selector"] == "full"]
        if stock:
            r["vs_stock_vllm"] = r["items_per_s"] / stock[0]["items_per_s"]


def table(rows: list[dict]) -> str:
    """The Markdown table printed on stdout."""
    head = ("| workload | engine, selector | batch | items/s | repeats: slowest-fastest | vis tok/item | "
            "gen tok/item (min-max) | decoded tok/item | TTFT s | output tok/s | speedup | ideal | measured/ideal | "
            "x stock vLLM | CPU stall % |")
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
            f"{fmt(r['vs_stock_vllm'])} | {fmt(r['cpu_stall_share'] and 100 * r['cpu_stall_share'], '{:.0f}')} |")
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
            ax.annotate(f"{fmt(r['speedup'])}x\n(ideal {fmt(r['ideal_speedup'])}x)",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [r["label"].replace(" ", "\n", 1) for r in rs], fontsize=8)
        ax.set(ylabel="items/s (median of repeats)", title=f"{name} answers (max {rs[0]['max_new_tokens']} tokens)")
        ax.set_ylim(0, 1.25 * max(r["items_per_s"] for r in rs))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _header(name, path, device, dtype_name, dims, roof, batch, n, workloads, t_pre, args) -> str:
    import torch

    return "\n".join([
        f"# hired-batch bench --engine {args.engine}: {name} ({path})",
        f"- machine: {machine(device)}",
        f"- HF engine: device {device}, dtype {dtype_name}, torch threads {torch.get_num_threads()}; "
        f"vLLM: its own platform and thread binding, same dtype",
        f"- roofline {roof.flops_per_s / 1e12:.2f} TFLOP/s, {roof.bytes_per_s / 1e9:.1f} GB/s",
        f"- {n} items per repeat, images {SIZES} (h, w), fresh images every repeat; batch / max_num_seqs {batch}; "
        f"{args.repeats} repeats (median), {args.warmup and 1} warm-up run",
        "- workloads: " + "; ".join(f"{w.name}: max_new_tokens {w.max_new_tokens} ({LENGTHS[w.lengths]}"
                                   f"{f' from [{DRAWN_SHORTEST}, {w.max_new_tokens}]' if w.lengths == 'drawn' else ''})"
                                   for w in workloads),
        f"- preprocessing {t_pre * 1e3:.0f} ms per item (median): outside the HF rows' wall, inside vLLM's",
        f"- load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- command: hired-batch {' '.join(sys.argv[1:])}",
    ])


def _write(rows, args, title: str) -> None:
    if args.json:
        write_json(args.json, {"rows": rows})  # NaN (an undefined rate) as null
    if args.plot:
        plot_figure(rows, title).savefig(args.plot, dpi=100)
