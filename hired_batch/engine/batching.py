"""Batch sizes that fit in memory, measuring peak memory, and backing off on OOM.

- ``estimate_item_bytes`` / ``batch_bytes``: what one item holds in each pass, and a
  batch's peak from config dimensions and token counts (the vision pass: held
  features plus CLIP's working set over one chunk of crops; or the LM's KV cache plus
  the prefill working set, whichever is larger: the vision pass is freed before prefill).
- ``auto_batch_size``: the largest batch whose weights + items fit a limit;
  ``memory_limit`` gives the limit (``--memory-limit`` such as "8GB", else the GPU's
  free memory, else the host's available memory).
- ``halve_on_oom``: run a batch, splitting it in halves on out-of-memory, down to
  single items (and, if asked, item by item on any other error); the caller decides
  what a single item that still fails becomes.
- ``PeakMemory``: the peak of one region of code (CUDA max allocated, or the process's
  resident-set high-water mark on CPU); the bench divides it by the batch size.

This module does not know Ray, does not load models and imports torch lazily.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from dataclasses import dataclass

from hired_batch.config import ConfigError, parse_bytes
from hired_batch.engine.dims import ItemTokens, ModelDims, kv_bytes_per_token, weight_bytes


def parse_batch_size(text) -> int | str:
    """A positive int, or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ConfigError(f"batch size must be a positive integer or 'auto', got {text!r}")
    return value


# --------------------------------------------------------------------------- grouping


def group_by_count(counts: list[int], batch_size: int) -> list[list[int]]:
    """Item indices in batches of similar token count, heaviest batch first.

    ``counts``: the planned prompt length per item (visual + text tokens,
    ``ItemTokens.n_prompt``). Left padding grows every item of a batch to its longest prompt, and a
    padded batch needs an explicit attention mask (no causal fast path in SDPA);
    sorting keeps that waste small (and an OOM, if any, shows up first).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class ItemMemory:
    """One item's share of a batch's peak, bytes."""

    vision: int  # what the vision pass holds per item: pixels, feature-layer states, projected features
    language: int  # embeddings + KV cache (prompt + answer) + one layer's prefill working set
    crops: int = 1  # image crops the item sends through the tower

    @property
    def peak(self) -> int:
        return max(self.vision, self.language)


def vision_work_bytes(d: ModelDims, n_crops: int) -> int:
    """CLIP's activations while one layer runs over ``n_crops`` crops at once.

    Per crop, 577 tokens x (the states before and after the layer, ~6 hidden-width
    buffers inside it, 2 MLP-width buffers); SDPA keeps no 577 x 577 matrix. Running
    the tower ``vision_chunk`` crops at a time caps this at the chunk's size.
    """
    per_tok = 8 * d.v_hidden + 2 * d.v_intermediate
    return int(n_crops * d.v_tokens * per_tok * d.bytes_per_param)


def estimate_item_bytes(d: ModelDims, item: ItemTokens, max_new_tokens: int, pixel_bytes: int = 4) -> ItemMemory:
    """Bytes one item holds in each pass (activations in the model dtype, d.bytes_per_param each).

    Vision: the float32 pixels, the feature-layer states of its crops (the tower's
    output, kept for every crop until selection) and the projected features (``full``
    projects every crop token); CLIP's working set is ``vision_work_bytes``.
    Language: inputs_embeds and the merged copy (2 x S x t), the KV cache for S +
    max_new_tokens positions, one layer's prefill buffers (residual, norm, attention
    out, q/k/v, SwiGLU gate/up/product) and a bool S x S attention mask (padded batches).
    """
    e, t = d.bytes_per_param, d.t_hidden
    projected = item.n_visual if item.n_projected is None else item.n_projected
    held = d.v_tokens * d.v_feature_layers * d.v_hidden * e + 3 * d.image_size**2 * pixel_bytes
    vision = item.n_crops * held + (projected + item.n_visual) * t * e
    S = item.n_prompt
    work = S * (3 * t + t + 2 * d.kv_dim + 3 * d.t_intermediate) * e
    language = 2 * S * t * e + (S + max_new_tokens) * kv_bytes_per_token(d) + work + S * S
    return ItemMemory(int(vision), int(language), int(item.n_crops))


def batch_bytes(d: ModelDims, items: list[ItemTokens], max_new_tokens: int, vision_chunk: int | None = None) -> int:
    """Peak bytes a batch of ``items`` adds to the weights: the larger of its two passes.

    The vision pass (what every item holds + CLIP's working set over at most
    ``vision_chunk`` crops; None = all crops at once) is freed before prefill.
    """
    mem = [estimate_item_bytes(d, i, max_new_tokens) for i in items]
    return _peak(d, sum(m.crops for m in mem), sum(m.vision for m in mem), sum(m.language for m in mem), vision_chunk)


def _peak(d: ModelDims, crops: int, vision: int, language: int, vision_chunk: int | None) -> int:
    """The larger pass of a batch holding ``vision`` / ``language`` bytes over ``crops`` crops."""
    work = vision_work_bytes(d, crops if vision_chunk is None else min(crops, vision_chunk))
    return max(work + vision, language)


def worst_case(d: ModelDims, items: list[ItemTokens], max_new_tokens: int) -> ItemMemory:
    """An item as heavy as any of ``items`` in each part: the most crops, the largest
    vision share, the largest language share (they may come from different items, so
    any batch drawn from ``items`` fits wherever this item's copies fit)."""
    mem = [estimate_item_bytes(d, i, max_new_tokens) for i in items]
    return ItemMemory(max(m.vision for m in mem), max(m.language for m in mem), max(m.crops for m in mem))


def copies_bytes(d: ModelDims, m: ItemMemory, n: int, vision_chunk: int | None = None) -> int:
    """``batch_bytes`` of n items like ``m``, in O(1)."""
    return _peak(d, n * m.crops, n * m.vision, n * m.language, vision_chunk)


def auto_batch_size(
    d: ModelDims,
    items: list[ItemTokens],
    max_new_tokens: int,
    limit_bytes: int,
    headroom: float = 0.9,
    max_batch: int = 1024,
    vision_chunk: int | None = None,
) -> int:
    """Largest n such that any n of ``items`` fit ``limit_bytes`` with the weights.

    Sized on ``worst_case(items)``. ``headroom`` keeps a share of what the weights leave
    for allocator slack and fragmentation; ``vision_chunk`` is the engine's crops per
    tower call. Raises ConfigError when not even one item fits.
    """
    worst = worst_case(d, items, max_new_tokens)
    free = (int(limit_bytes) - weight_bytes(d)) * headroom
    lo, hi = 0, max_batch  # the largest n with copies_bytes(n) <= free: it grows with n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if copies_bytes(d, worst, mid, vision_chunk) <= free:
            lo = mid
        else:
            hi = mid - 1
    if lo < 1:
        one = copies_bytes(d, worst, 1, vision_chunk)
        raise ConfigError(
            f"memory limit {limit_bytes / 1e9:.2f} GB cannot hold the weights ({weight_bytes(d) / 1e9:.2f} GB) "
            f"plus one item ({one / 1e9:.3f} GB at {headroom:.0%} headroom)"
        )
    return lo


def memory_limit(text=None, device: str = "cpu") -> int:
    """Bytes a batch may use, weights included.

    ``text`` (e.g. "8GB") wins; else on CUDA the free memory plus what torch has
    reserved (the weights, if loaded, and its cache of freed blocks: the limit must
    not shrink after the first batch); else the host's available memory plus this
    process's resident set.
    """
    if text is not None:
        return parse_bytes(text)
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        # reserved = in use + torch's cache of freed blocks, which later batches reuse
        return int(free + torch.cuda.memory_reserved(dev))
    import psutil

    return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


# --------------------------------------------------------------------------- OOM backoff


def is_oom(exc: BaseException) -> bool:
    """True for allocation failures: torch's OutOfMemoryError, or a RuntimeError/MemoryError saying so."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_cache() -> None:
    """Return cached device blocks after an OOM so the retry starts clean."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def halve_on_oom(run, idx: list, on_alone, on_error=None) -> int:
    """Run ``run(idx)``; on an allocation failure free the cache and run each half the
    same way, down to single items. ``on_alone(i, exc)`` is told of an item that runs
    out of memory alone (the job writes an error row; the bench re-raises).

    Other exceptions pass through untouched, unless ``on_error`` is given: then a batch
    that raises one is run again item by item, and ``on_error(i, exc)`` is told of each
    item that fails alone (the job: one bad row must not take its batch with it).
    Returns how many times a batch was halved.

    The one backoff: the generation stage and the bench both use it, so the bench
    measures what the job does.
    """
    if not idx:
        return 0
    try:
        run(idx)
        return 0
    except Exception as e:  # noqa: BLE001 - allocation failures, and others when on_error is given
        if not is_oom(e):
            if on_error is None:
                raise
            if len(idx) == 1:
                on_error(idx[0], e)
                return 0
            return sum(halve_on_oom(run, [i], on_alone, on_error) for i in idx)
        free_cache()
        if len(idx) == 1:
            on_alone(idx[0], e)
            return 0
    half = len(idx) // 2
    return 1 + halve_on_oom(run, idx[:half], on_alone, on_error) + halve_on_oom(run, idx[half:], on_alone, on_error)


# --------------------------------------------------------------------------- measuring


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _hwm() -> int:
    """VmHWM of this process (bytes), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm() > 0
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap pages back to the OS, so a later region's RSS starts low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a ``with`` block, bytes: ``base`` at entry, ``peak`` during.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors only, no allocator
    cache). CPU: the process's RSS high-water mark, reset at entry through
    /proc/self/clear_refs after returning freed heap to the OS (malloc_trim); where
    that is refused, a thread samples RSS every ``interval_s`` (may miss short peaks).
    RSS is process-wide: other threads' allocations count too.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.002):
        self.device = str(device)
        self.interval_s = interval_s
        self.base = self.peak = 0
        self._thread = None
        self._stop = threading.Event()
        self._sampled = 0

    @property
    def delta(self) -> int:
        """What the block added on top of the memory held at entry."""
        return max(0, self.peak - self.base)

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _trim()
        self.base = _rss_now()
        if not _reset_hwm():
            self._sampled = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_now())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, _rss_now())
        else:
            self.peak = _hwm()
        return False
