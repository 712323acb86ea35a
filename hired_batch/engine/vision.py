"""The CLIP side of the engine: the vision tower's parts, and CLS attention rows from hooks.

``ClsAttentionHooks`` computes only the CLS query's attention row of chosen layers
from their q/k projections (one GEMM, no 577 x 577 matrix); SDPA still does the real
attention. This module does not know Ray and holds no model state.
"""

from __future__ import annotations

import contextlib
import time

import torch

from hired_batch.config import ConfigError
from hired_batch.engine.dims import feature_layer_ids

# A file each vision-tower run appends a line to ("<images>\n"), when this variable names one:
# how tests count tower runs per image across processes (Ray actors, vLLM's engine core).
VISION_LOG_ENV = "HIRED_BATCH_VISION_LOG"


def note_vision_run(n_images: int) -> None:
    """Record one vision-tower run over ``n_images`` images in ``VISION_LOG_ENV``'s file (if set)."""
    import os

    path = os.environ.get(VISION_LOG_ENV)
    if path:
        with open(path, "a") as f:  # one short append: whole lines even from several processes
            f.write(f"{int(n_images)}\n")


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run small CPU work (selection) on one thread, then restore the pool size.

    Waking a second thread costs more than these ops (a few MFLOPs); measured on a
    2-core machine that other processes share, a (5, 577, 384) CLS-row bmm took
    0.3 ms on one thread and 4-6 ms on two. No effect on CUDA tensors.
    """
    if device.type != "cpu" or torch.set_num_threads is not torch._C.set_num_threads:
        # vLLM's CPU worker pins its threads and replaces set_num_threads with a warning:
        # leave its pool as it is (one warning per image otherwise)
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class ClsAttentionHooks:
    """Captures the CLS->patch attention row of chosen CLIP layers from q/k projections.

    The hooks keep only the CLS query and compute softmax(q_cls . k / sqrt(d)) over
    all keys, then drop the CLS key and sum heads: (B, N) per layer. They sit on
    ``q_proj``/``k_proj`` (transformers' CLIP) or on a fused ``qkv_proj`` returning
    ``(q|k|v, bias)`` (vLLM's CLIP, for the plugin in ``hired_batch/engine/vllm``). Nothing else in
    the tower changes: SDPA still does the real attention.

    Also, for the layers in ``key_ids``, the patch keys averaged over heads (B, N, Dh)
    in ``keys`` (VisionZip's similarity), and for the layers in ``state_ids`` the CLS
    state of the layer's output (B, Dv) in ``states`` (VisionZip sends the feature
    layer's CLS token, which the features drop). Both stay on the tower's device.
    """

    def __init__(self, layers, layer_ids, num_heads: int, key_ids=(), state_ids=()):
        self.num_heads = num_heads
        self.rows: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        self._row_ids, self._key_ids = set(layer_ids), set(key_ids)
        self._q: dict[int, torch.Tensor] = {}
        self._handles = []
        self._spans = []  # (start, end) per CLS row: perf_counter floats, or CUDA events
        for lid in sorted(self._row_ids | self._key_ids):
            attn = layers[lid].self_attn
            if hasattr(attn, "qkv_proj"):  # vLLM's CLIP: one fused projection, output (qkv, bias)
                self._handles.append(attn.qkv_proj.register_forward_hook(self._grab_qkv(lid, attn.scale)))
                continue
            if lid in self._row_ids:
                self._handles.append(attn.q_proj.register_forward_hook(self._grab_q(lid)))
            self._handles.append(attn.k_proj.register_forward_hook(self._grab_k(lid, attn.scale)))
        for lid in sorted(set(state_ids)):
            self._handles.append(layers[lid].register_forward_hook(self._grab_state(lid)))

    def _grab_q(self, lid):
        def hook(module, inputs, output):
            self._q[lid] = output[:, 0]  # (B, D): only the CLS query is needed

        return hook

    def _grab_k(self, lid, scale):
        def hook(module, inputs, output):
            if lid in self._key_ids:  # (B, N, Dh): heads averaged, CLS key dropped
                B, T, D = output.shape
                self.keys[lid] = output.reshape(B, T, self.num_heads, D // self.num_heads).mean(dim=2)[:, 1:]
            if lid not in self._row_ids:
                return
            start = self._mark(output.device)
            with one_thread(output.device):
                self.rows[lid] = self._cls_row(self._q.pop(lid), output, scale)
            self._spans.append((start, self._mark(output.device)))

        return hook

    def _grab_qkv(self, lid, scale):
        k_hook = self._grab_k(lid, scale)

        def hook(module, inputs, output):
            qkv = output[0] if isinstance(output, tuple) else output  # (B, T, 3D), q | k | v
            q, k, _ = qkv.chunk(3, dim=-1)
            if lid in self._row_ids:
                self._q[lid] = q[:, 0]
            k_hook(module, inputs, k)

        return hook

    def _grab_state(self, lid):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, Dv)
            self.states[lid] = hidden[:, 0]

        return hook

    @staticmethod
    def _mark(device):
        """A timestamp that needs no sync: a recorded CUDA event, or the host clock on CPU."""
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self) -> float:
        """Time spent computing CLS rows. On CUDA, call after a sync (events must be done)."""
        return sum(b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3 for a, b in self._spans)

    def _cls_row(self, q_cls, keys, scale) -> torch.Tensor:
        B, T, D = keys.shape
        h = self.num_heads
        # One GEMM against a block-diagonal query, (B, T, D) @ (B, D, H): keys are read
        # in place (a per-head einsum copies them; 3-4x slower on CPU), and the zeros
        # add h x tiny FLOPs.
        eye = torch.eye(h, dtype=torch.float32, device=keys.device)
        q = (q_cls.float().view(B, h, D // h, 1) * eye.view(1, h, 1, h)).reshape(B, D, h)
        logits = torch.bmm(keys.float(), q) * scale  # (B, T, H), T = 1 + N
        return logits.softmax(dim=1)[:, 1:].sum(dim=2)  # (B, N): CLS key dropped after softmax

    def remove(self):
        for h in self._handles:
            h.remove()


def vision_parts(tower):
    """(embeddings, pre_layernorm, encoder layers) of a CLIP vision tower."""
    inner = getattr(tower, "vision_model", tower)
    missing = [n for n in ("embeddings", "pre_layrnorm", "encoder") if not hasattr(inner, n)]
    if missing:
        raise ConfigError(f"expected a CLIP vision tower, {type(inner).__name__} lacks {missing}")
    return inner.embeddings, inner.pre_layrnorm, inner.encoder.layers


# l_init: the CLIP encoder layer whose CLS attention splits the budget over sub-images (the
# paper's and the published code's first layer; reference mode reproduces masks made with it).
INIT_LAYER = 0


def selection_layers(cfg, n_built: int) -> tuple[list[int], int, int]:
    """(feature hidden_states ids, l_init, l_final) of a LLaVA config.

    Every backend asks this one function: the checkpoint must drop CLS from its features
    (``vision_feature_select_strategy`` "default"; the N = 576 tokens per crop of the token
    plan rely on it); l_init is ``INIT_LAYER`` and l_final the layer whose output the
    features are (the paper's choice), and both must be among the ``n_built`` encoder
    layers the backend built. ConfigError otherwise.
    """
    strategy = cfg.vision_feature_select_strategy
    if strategy != "default":
        raise ConfigError(f"vision_feature_select_strategy must be 'default' (CLS dropped), got {strategy!r}")
    feature_ids = feature_layer_ids(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)
    l_final = max(feature_ids) - 1
    if l_final >= n_built:
        raise ConfigError(f"the CLS layers must be among the {n_built} CLIP layers built, got l_final {l_final}")
    return feature_ids, INIT_LAYER, l_final
