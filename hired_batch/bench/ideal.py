"""FLOP and byte model of a HiRED-LLaVA batch: the speedup pruning *should* give.

A batch costs three phases, each timed by a roofline, max(FLOPs / peak FLOP/s,
bytes / memory bandwidth):

1. vision: the CLIP tower on every crop, up to the feature layer (pruning happens
   after it, so this cost is the same for every budget), plus the projector on the
   tokens it sees;
2. prefill: the language model on text + visual tokens, the causal attention's
   quadratic term included, the LM head on the last position only;
3. decode: ``max_new_tokens - 1`` steps (prefill yields the first token); each step
   reads the LM weights once for the whole batch and every item's KV cache.

FLOPs count a multiply-add as 2. Assumptions (written out in docs/performance.md):
no padding (each item costs its own length), causal attention costs half the square,
layer norms / activations / softmax / rotary / embedding lookups are free, weights are
read once per phase (prefill) or per step (decode), activations stay in cache.

This module does not run a model or know transformers classes: it reads config
dimensions (``hired_batch.engine.dims``) and per-item token counts from the one token
plan (``hired_batch.engine.token_plan``). ``calibrate`` is the one function that runs torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.config import SelectionConfig
from hired_batch.engine import token_plan
from hired_batch.engine.dims import (
    ANYRES_PINPOINTS,
    ItemTokens,
    ModelDims,
    kv_bytes_per_token,
    lm_layer_params,
    lm_params,
    projector_params,
    vision_params,
)

# --------------------------------------------------------------------------- FLOPs


def vision_flops_per_crop(d: ModelDims) -> int:
    """Patch embedding + every CLIP layer run: projections, MLP and T x T attention."""
    T, D = d.v_tokens, d.v_hidden
    embed = 2 * d.n_patches * 3 * d.patch_size**2 * D
    per_layer = 2 * T * (4 * D * D + 2 * D * d.v_intermediate) + 4 * T * T * D  # QK^T and AV
    return embed + d.v_layers_run * per_layer


def projector_flops(d: ModelDims, n_tokens: int) -> int:
    return 2 * n_tokens * projector_params(d)


def lm_dense_flops_per_token(d: ModelDims) -> int:
    """Weight matmuls of all decoder layers for one position (no attention, no head)."""
    return 2 * d.t_layers * lm_layer_params(d)


def prefill_flops(d: ModelDims, n_tokens: int) -> int:
    """Prefill of one prompt of S tokens: S x dense + causal attention + head on the last.

    Causal attention: query i meets i keys, 2*i*t FLOPs for QK^T and as many for AV,
    summed over i = 1..S: 2*t*S*(S+1) per layer.
    """
    S, t = n_tokens, d.t_hidden
    attn = d.t_layers * 2 * t * S * (S + 1)
    return S * lm_dense_flops_per_token(d) + attn + 2 * t * d.vocab


def decode_step_flops(d: ModelDims, context: int) -> int:
    """One new token after ``context`` cached positions (it attends context + 1 keys)."""
    attn = d.t_layers * 4 * d.t_hidden * (context + 1)
    return lm_dense_flops_per_token(d) + attn + 2 * d.t_hidden * d.vocab


def flop_ratio(d: ModelDims, n_prompt: int | None = None) -> float:
    """LM : vision FLOPs per token.

    Without ``n_prompt``: weight matmuls only (the config ratio, ~22 for LLaVA-NeXT-7B).
    With it: attention included, vision over its 577-token crops, the LM averaged over
    a prefill of ``n_prompt`` tokens.
    """
    if n_prompt is None:
        vision = d.v_layers_run * 2 * (4 * d.v_hidden**2 + 2 * d.v_hidden * d.v_intermediate)
        return lm_dense_flops_per_token(d) / vision
    lm = (prefill_flops(d, n_prompt) - 2 * d.t_hidden * d.vocab) / n_prompt
    return lm / (vision_flops_per_crop(d) / d.v_tokens)


# --------------------------------------------------------------------------- roofline


@dataclass(frozen=True)
class Roofline:
    """A machine as two numbers."""

    flops_per_s: float  # sustained matmul throughput, FLOP/s
    bytes_per_s: float  # sustained memory bandwidth, bytes/s

    def time(self, flops: float, nbytes: float) -> float:
        """Seconds for a phase: whichever of compute or memory traffic is slower."""
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)


@dataclass(frozen=True)
class BatchTime:
    """Predicted seconds per batch, by phase."""

    vision_s: float
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.vision_s + self.prefill_s + self.decode_s


def batch_time(d: ModelDims, items: list[ItemTokens], max_new_tokens: int, roof: Roofline) -> BatchTime:
    """Roofline time of one batch (no padding: each item costs its own length)."""
    # 1) vision: all crops, then the projector; reads the tower and projector once
    v_flops = sum(i.n_crops * vision_flops_per_crop(d) for i in items)
    v_flops += sum(projector_flops(d, i.n_visual if i.n_projected is None else i.n_projected) for i in items)
    v_bytes = (vision_params(d) + projector_params(d)) * d.bytes_per_param
    t_vision = roof.time(v_flops, v_bytes)
    # 2) prefill: weights once, KV of every prompt position written
    lm_bytes = lm_params(d) * d.bytes_per_param
    kv = kv_bytes_per_token(d)
    p_flops = sum(prefill_flops(d, i.n_prompt) for i in items)
    t_prefill = roof.time(p_flops, lm_bytes + kv * sum(i.n_prompt for i in items))
    # 3) decode: per step, weights once for the batch + every item's cache read
    t_decode = 0.0
    for k in range(max_new_tokens - 1):
        ctx = [i.n_prompt + k for i in items]
        flops = sum(decode_step_flops(d, c) for c in ctx)
        t_decode += roof.time(flops, lm_bytes + kv * sum(c + 1 for c in ctx))
    return BatchTime(t_vision, t_prefill, t_decode)


def workload_time(d: ModelDims, batches: list[list[ItemTokens]], max_new_tokens: int, roof: Roofline) -> float:
    """Seconds for a sequence of batches."""
    return sum(batch_time(d, b, max_new_tokens, roof).total_s for b in batches)


# --------------------------------------------------------------------------- many questions per image


def suffix_prefill_flops(d: ModelDims, n_prefix: int, n_suffix: int) -> int:
    """Prefill of ``n_suffix`` tokens continuing a cached prefix of ``n_prefix``: their dense
    matmuls, their causal attention over prefix + suffix, the head on the last."""
    whole, prefix = prefill_flops(d, n_prefix + n_suffix), prefill_flops(d, n_prefix)
    return whole - prefix + 2 * d.t_hidden * d.vocab  # each of the two counted the head once


def ask_times(
    d: ModelDims, items: list[ItemTokens], n_question: int, k: int, max_new_tokens: int, roof: Roofline
) -> tuple[float, float]:
    """(separate, shared) seconds for asking ``k`` questions of every image in ``items``
    (one batch of images; ``n_question``: the tokens of the prompt after the last image token).

    separate: every (image, question) is its own item: the tower, the prefix and the
    question k times. shared (``--ask``): the tower and the prefix (system prompt + image
    tokens) once per image, then each question's tokens continuing the prefix's cache;
    decoding is the same k x len(items) answers either way."""
    separate = batch_time(d, [i for i in items for _ in range(k)], max_new_tokens, roof).total_s
    prefix = [ItemTokens(i.n_crops, i.n_visual, i.n_text - n_question, i.n_projected) for i in items]
    once = batch_time(d, prefix, 1, roof)  # vision + prefix prefill, no decode step
    lm_bytes = lm_params(d) * d.bytes_per_param
    kv = kv_bytes_per_token(d)
    q_flops = k * sum(suffix_prefill_flops(d, p.n_prompt, n_question) for p in prefix)
    t_questions = roof.time(q_flops, lm_bytes + kv * k * sum(i.n_prompt for i in items))  # prefix KV read k times
    decode = batch_time(d, [i for i in items for _ in range(k)], max_new_tokens, roof).decode_s
    return separate, once.vision_s + once.prefill_s + t_questions + decode


def ask_saving(d: ModelDims, items, n_question: int, k: int, max_new_tokens: int, roof: Roofline) -> float:
    """The share of the separate rows' time ``--ask`` saves (``ask_times``): 1 - shared / separate."""
    separate, shared = ask_times(d, items, n_question, k, max_new_tokens, roof)
    return 1.0 - shared / separate


# --------------------------------------------------------------------------- token counts


def item_tokens(d: ModelDims, hw, selection: SelectionConfig, n_text: int, pinpoints=ANYRES_PINPOINTS) -> ItemTokens:
    """Tokens of one (height, width) image under ``selection``, for a model known only by
    its sizes: ``token_plan.item_tokens`` (the plan the engines, the generation stage and
    the memory model use) on ``d``'s geometry; ``n_text`` excludes the ``<image>`` placeholder."""
    return token_plan.item_tokens(hw, selection, token_plan.Geometry.from_dims(d, pinpoints), n_text + 1)


# --------------------------------------------------------------------------- calibration


def calibrate(
    device: str = "cpu", dtype: str = "float32", m: int = 2048, k: int = 1024, n: int = 2816, mbytes: int = 256
) -> Roofline:
    """Measure this machine: a (m,k)@(k,n) matmul and a large copy (about a second).

    The copy counts read + write. Best of a few repetitions, after one warm-up.
    """
    import time

    import torch

    dev, dt = torch.device(device), getattr(torch, dtype)

    def best(fn, reps=5):
        fn()
        out = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            out.append(time.perf_counter() - t0)
        return min(out)

    a, b = torch.randn(m, k, device=dev, dtype=dt), torch.randn(k, n, device=dev, dtype=dt)
    flops = 2 * m * k * n / best(lambda: a @ b)
    src = torch.empty(mbytes * 2**20 // a.element_size(), device=dev, dtype=dt).fill_(1)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / best(lambda: dst.copy_(src))
    return Roofline(flops, bw)
