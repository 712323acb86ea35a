"""HiRED token selection: pure torch math on CLS-attention maps.

Given the CLS->patch attention of each partition (full image + anyres sub-images) at
the first encoder layer (l_init) and at the feature layer (l_final), decide which
visual tokens survive a fixed budget. Two modes:

- ``exact`` (default): Eq. 1 + Eq. 2 of the paper with an exact budget
  (largest-remainder shares, caps redistributed), real sub-image regions, padding
  tokens never kept, ties to the lower index.
- ``reference``: the published implementation's masks, floors and raster-stripe
  regions included, for comparison with the paper's tables; ``packed_order`` with
  ``mode="reference"`` gives the tokens that code then sends (its transposed
  sub-image canvas and float32 unpadding).

Also the baseline selectors (full, spatial, random) and the anyres geometry helpers
(which tokens hold image content, which full-image tokens cover each sub-image, in
which order LLaVA-NeXT lists the unpadded grid).

This module does not know transformers or Ray, does not run a model and never moves
tensors between devices: inputs and outputs live where the caller put them.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from hired_batch.config import MODES, SELECTORS


# --------------------------------------------------------------------------- checks


def _check_inputs(init_attn, final_attn, grid, alpha, mode) -> tuple[int, int]:
    """Validate shapes and knobs shared by every selector; returns (P, N)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if init_attn.dim() != 2 or final_attn.shape != init_attn.shape:
        raise ValueError(
            "init_attn and final_attn must both be (P, N) tensors of the same shape, "
            f"got {tuple(init_attn.shape)} and {tuple(final_attn.shape)}"
        )
    P, N = init_attn.shape
    _check_grid(grid, P)
    if torch.isnan(init_attn).any() or torch.isnan(final_attn).any():
        raise ValueError("attention maps contain NaN; expected finite CLS attention")
    return P, N


def _check_grid(grid, P: int) -> None:
    if P == 1:
        if grid is not None:
            raise ValueError(f"grid must be None for a single partition (P=1), got {grid!r}")
        return
    if grid is None or len(grid) != 2 or grid[0] * grid[1] != P - 1:
        raise ValueError(
            f"grid must be (rows, cols) with rows*cols == P-1 == {P - 1}, got {grid!r}"
        )


def _check_mask_arg(name: str, value, shape: tuple[int, int]) -> torch.Tensor | None:
    if value is None:
        return None
    if value.dtype != torch.bool or tuple(value.shape) != shape:
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape}, "
            f"got dtype {value.dtype} shape {tuple(value.shape)}"
        )
    return value


def resolve_budget(budget, n_total: int) -> int:
    """Token count a budget asks for out of ``n_total`` tokens.

    A float in (0, 1] is a fraction (rounded to nearest, at least 1 token); an int >= 1
    is a token count. Raises ValueError for anything else.
    """
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a float in (0, 1] or an int >= 1, got {budget!r}")
    if isinstance(budget, numbers.Integral):  # int, numpy/torch integer scalars
        if budget < 1:
            raise ValueError(f"budget as a token count must be >= 1, got {budget}")
        return min(int(budget), n_total)
    if isinstance(budget, numbers.Real) and 0.0 < float(budget) <= 1.0:
        return max(1, round(float(budget) * n_total))
    raise ValueError(f"budget must be a float in (0, 1] or an int >= 1, got {budget!r}")


# --------------------------------------------------------------------------- top-k


def topk_mask(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` highest scores (1-D), ties to the lower index.

    Only ``valid`` positions can win; ``k`` must not exceed their count.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    # A stable descending sort keeps equal scores in index order: ties go low.
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    mask[order] = True
    return mask


def largest_remainder(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split ``total`` integer units over parts in proportion to ``weights``.

    Each part is capped at ``caps``; what a capped part cannot take is shared again
    among the others in proportion to their weights (parts with zero weight share by
    capacity when no weight is left). Ties in the remainders go to the lower index.
    Returns int64 shares with ``shares.sum() == min(total, caps.sum())``.
    """
    weights = weights.double().clamp(min=0).cpu()
    caps = caps.long().cpu()
    shares = torch.zeros_like(caps)
    left = min(int(total), int(caps.sum()))
    for _ in range(len(caps) + 1):  # each pass fills at least one part, or ends
        open_ = shares < caps
        if left <= 0 or not open_.any():
            break
        w = torch.where(open_, weights, torch.zeros_like(weights))
        if w.sum() <= 0:
            w = torch.where(open_, (caps - shares).double(), torch.zeros_like(weights))
        left = _share_once(left, w, caps, shares)
    return shares


def _share_once(left: int, w: torch.Tensor, caps: torch.Tensor, shares: torch.Tensor) -> int:
    """One largest-remainder pass; updates ``shares`` in place, returns what is left."""
    quota = w / w.sum() * left
    base = quota.floor().long()
    rest = left - int(base.sum())
    # 1) hand the leftover units to the largest remainders (ties: lower index)
    order = torch.sort(quota - base, descending=True, stable=True).indices
    order = order[w[order] > 0][:rest]
    base[order] += 1
    # 2) cap, and return what did not fit to the pool
    room = caps - shares
    take = torch.minimum(base, room)
    shares += take
    return left - int(take.sum())


# --------------------------------------------------------------------------- geometry


def grid_side(n_tokens: int) -> int:
    """Side of the square patch grid (24 for CLIP-L/14 at 336 px)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"expected a square number of patch tokens, got {n_tokens}")
    return side


def unpadded_box(image_hw: Sequence[int], grid: Sequence[int], side: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the content in the anyres canvas, in token units.

    Mirrors LLaVA-NeXT's ``unpad_image`` on the (rows*side, cols*side) token canvas:
    the image was resized to fit the canvas and padded symmetrically; the same number
    of token rows (or columns) is cut from both sides.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    cur_h, cur_w = grid[0] * side, grid[1] * side
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(w * (cur_h / h), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def anyres_valid(image_hw, grid, n_tokens: int) -> torch.Tensor:
    """Bool (P, N): True where a token holds image content (kept by unpadding).

    Partition 0 (the full image, squashed to the square) is all content.
    """
    side = grid_side(n_tokens)
    rows, cols = grid
    top, bottom, left, right = unpadded_box(image_hw, grid, side)
    canvas = torch.zeros(rows * side, cols * side, dtype=torch.bool)
    canvas[top:bottom, left:right] = True
    # (rows*side, cols*side) -> (rows, cols, side, side) -> (rows*cols, N)
    subs = canvas.view(rows, side, cols, side).permute(0, 2, 1, 3).reshape(rows * cols, -1)
    full = torch.ones(1, n_tokens, dtype=torch.bool)
    return torch.cat([full, subs], dim=0)


def anyres_regions(image_hw, grid, n_tokens: int) -> torch.Tensor:
    """Bool (P-1, N): which full-image tokens cover the content of each sub-image.

    The full image shows the whole content squashed to side x side tokens; the
    content occupies the unpadded box of the canvas. Each full-image token's centre
    is mapped into the canvas; the sub-image it lands in claims it. Every full token
    belongs to exactly one region; a sub-image made only of padding gets none.
    """
    side = grid_side(n_tokens)
    rows, cols = grid
    top, bottom, left, right = unpadded_box(image_hw, grid, side)
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    y = top + centres * (bottom - top)  # canvas token row of each full-image row
    x = left + centres * (right - left)
    r = (y // side).long().clamp(0, rows - 1)
    c = (x // side).long().clamp(0, cols - 1)
    owner = (r[:, None] * cols + c[None, :]).reshape(-1)  # (N,) sub-image index
    return owner[None, :] == torch.arange(rows * cols)[:, None]


def block_regions(grid, n_tokens: int) -> torch.Tensor:
    """Bool (P-1, N): default regions, the rows x cols spatial blocks of the grid."""
    side = grid_side(n_tokens)
    rows, cols = grid
    idx = torch.arange(side)
    r = idx * rows // side
    c = idx * cols // side
    owner = (r[:, None] * cols + c[None, :]).reshape(-1)
    return owner[None, :] == torch.arange(rows * cols)[:, None]


def reference_unpadded_box(image_hw: Sequence[int], canvas_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) the published HiRED code keeps of a (height, width) canvas.

    Its ``unpad_image`` receives the image size as an int64 tensor, so the aspect ratio
    and the scale are float32 and the new side is truncated by ``int()``, not rounded
    in float64 as ``unpadded_box`` (stock transformers) does: on a few sizes
    (1216x684, 684x1216, 1044x1856 among others) one more token row is cut per side.
    The canvas is passed in, not the grid, because that code lays the grid out
    transposed (see ``packed_order``).
    """
    h, w = torch.tensor(int(image_hw[0])), torch.tensor(int(image_hw[1]))  # int64, as its processor gives
    cur_h, cur_w = int(canvas_hw[0]), int(canvas_hw[1])
    # int64 / int64 and int / int64 divide in float32 (torch's default float dtype);
    # comparing with a Python float casts that float to float32 too.
    if bool(w / h > cur_w / cur_h):
        new_h = int(h * (cur_w / w))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(w * (cur_h / h))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def packed_order(image_hw, grid, n_tokens: int, mode: str = "exact") -> torch.Tensor:
    """Flat (p * N + j) indices of every token LLaVA-NeXT sends, in its order.

    Full image first (raster), then the unpadded canvas row by row across all
    sub-images (not sub-image by sub-image). Image-newline tokens are not included.
    For P == 1 (grid None) it is simply ``arange(N)``.

    ``mode="exact"``: stock LLaVA-NeXT's geometry, the sub-images on their (rows, cols)
    grid, cut by ``unpadded_box``. ``mode="reference"``: what the published HiRED code
    sends. Its grid helper returns (rows, cols) but its packing reads the pair as
    (width, height), so the row-major list of sub-images is laid out on a (cols, rows)
    grid (transposed when rows != cols) and that canvas is then cut against the
    image's own aspect ratio by ``reference_unpadded_box``: on a 1x3 image most
    sub-image tokens fall outside the cut and are never sent.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if grid is None:
        return torch.arange(n_tokens)
    side = grid_side(n_tokens)
    rows, cols = grid
    if mode == "reference":
        rows, cols = cols, rows  # the published packing's (height, width) view
        top, bottom, left, right = reference_unpadded_box(image_hw, (rows * side, cols * side))
    else:
        top, bottom, left, right = unpadded_box(image_hw, grid, side)
    flat = torch.arange(rows * cols * n_tokens).view(rows, cols, side, side) + n_tokens
    canvas = flat.permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    return torch.cat([torch.arange(n_tokens), canvas[top:bottom, left:right].reshape(-1)])


# --------------------------------------------------------------------------- HiRED


def hired_mask(
    init_attn: torch.Tensor,
    final_attn: torch.Tensor,
    *,
    budget,
    alpha: float = 0.5,
    grid=None,
    mode: str = "exact",
    regions: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """HiRED keep-mask, bool (P, N).

    ``init_attn``/``final_attn``: (P, N) CLS->patch attention at l_init / l_final,
    summed over heads; row 0 is the full image, rows 1.. the sub-images in row-major
    ``grid`` = (rows, cols) order (None when P == 1). ``budget``: fraction of P*N in
    (0, 1] or a token count. ``mode``: "exact" or "reference" (see module docstring).
    ``regions`` (P-1, N) and ``valid`` (P, N) are used by exact mode only.
    """
    P, N = _check_inputs(init_attn, final_attn, grid, alpha, mode)
    if mode == "reference":
        return _reference_mask(init_attn, final_attn, budget, alpha, grid)
    valid = _check_mask_arg("valid", valid, (P, N))
    valid = torch.ones(P, N, dtype=torch.bool, device=init_attn.device) if valid is None else valid
    if P == 1:
        k = min(resolve_budget(budget, N), int(valid.sum()))
        return topk_mask(final_attn[0], k, valid[0])[None]
    regions = _check_mask_arg("regions", regions, (P - 1, N))
    regions = block_regions(grid, N).to(init_attn.device) if regions is None else regions
    counts = _exact_counts(init_attn[0], budget, alpha, regions, valid)
    rows = [topk_mask(final_attn[p], int(counts[p]), valid[p]) for p in range(P)]
    return torch.stack(rows)


def _exact_counts(init_full, budget, alpha, regions, valid) -> torch.Tensor:
    """Per-partition token counts (P,) for exact mode: Eq. 1 with exact rounding."""
    P, N = valid.shape
    caps = valid.sum(dim=1).cpu()  # (P,) CPU<->GPU sync: counts steer Python control flow
    total = min(resolve_budget(budget, P * N), int(caps.sum()))
    # 1) the full image's share, alpha of the budget (capped at its valid tokens)
    full = min(int(math.floor(alpha * total + 0.5)), int(caps[0]))
    # 2) Eq. 1: sub-image i's score is the l_init attention its region holds
    content = init_full.double() * valid[0]
    scores = (regions.double() * content[None, :]).sum(dim=1).cpu()  # (P-1,)
    subs = largest_remainder(total - full, scores, caps[1:])
    # 3) whatever the sub-images could not hold goes back to the full image
    full += min(total - full - int(subs.sum()), int(caps[0]) - full)
    return torch.cat([torch.tensor([full]), subs])


def _reference_mask(init_attn, final_attn, budget, alpha, grid) -> torch.Tensor:
    """The published code's masks, rule for rule (docs/reference-mode.md)."""
    P, N = init_attn.shape
    if not isinstance(budget, numbers.Integral) and float(budget) >= 1.0:
        # The published code selects only when its rate is below 1.0; at 1.0 every
        # token is kept (its floors would otherwise drop a few sub-image tokens).
        return torch.ones(P, N, dtype=torch.bool, device=init_attn.device)
    mask = torch.zeros(P, N, dtype=torch.bool, device=init_attn.device)
    if P == 1:
        k = min(N, _reference_total(budget, N))
        mask[0, final_attn[0].topk(k, largest=True).indices] = True
        return mask
    # 1) budgets with the published floors
    total = _reference_total(budget, P * N)
    full = min(int(total * alpha), N)
    sub = min(total - full, (P - 1) * N)
    # 2) full image: top `full` by l_final attention
    mask[0, final_attn[0].topk(full, largest=True).indices] = True
    if sub > 0:
        ks = _reference_sub_budgets(init_attn[0], alpha, P - 1, sub, N)
        for i, k in enumerate(ks.tolist()):
            mask[i + 1, final_attn[i + 1].topk(k, largest=True).indices] = True
    return mask


def _reference_total(budget, n_total: int) -> int:
    """floor(n_total * budget) for a fraction, the count itself for an int."""
    resolve_budget(budget, n_total)  # validates either form
    if isinstance(budget, numbers.Integral):
        return min(int(budget), n_total)
    return int(n_total * float(budget))


def _reference_sub_budgets(init_full, alpha, n_subs: int, sub: int, N: int) -> torch.Tensor:
    """Sub-image budgets: marked-token counts in raster stripes, floored, capped at N."""
    marked = torch.zeros(N, dtype=torch.bool, device=init_full.device)
    marked[init_full.topk(int(N * (1 - alpha)), largest=True).indices] = True
    # The published code reshapes the 576-vector into (rows, cols, -1): consecutive
    # raster slices, not spatial quadrants.
    counts = marked.reshape(n_subs, -1).sum(dim=-1)  # (P-1,) int64
    if int(counts.sum()) == 0:
        # alpha == 1 marks nothing; the published code divides 0/0 here. We give the
        # sub-images nothing instead of undefined integer casts of NaN.
        return torch.zeros(n_subs, dtype=torch.int32)
    ratio = counts / counts.sum()  # float32, as torch's true division of int64 gives
    return torch.clamp((ratio * sub).int(), max=N)


# --------------------------------------------------------------------------- baselines


def full_mask(valid: torch.Tensor) -> torch.Tensor:
    """Keep every token that holds image content (stock LLaVA)."""
    return valid.clone()


def spatial_mask(budget, valid: torch.Tensor) -> torch.Tensor:
    """Evenly spaced tokens in each partition (the paper's Spatial baseline).

    The exact budget is split over partitions by valid-token count (largest
    remainder); within a partition the kept tokens are evenly spaced over its
    valid tokens in raster order.
    """
    counts = _baseline_counts(budget, valid)
    mask = torch.zeros_like(valid)
    for p, k in enumerate(counts.tolist()):
        idx = valid[p].nonzero().flatten()
        if k > 0:
            pick = ((torch.arange(k, dtype=torch.float64) + 0.5) * len(idx) / k).long()
            mask[p, idx[pick]] = True
    return mask


def random_mask(budget, valid: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniformly random valid tokens, same per-partition counts as ``spatial_mask``.

    Deterministic for a given seed (a private CPU generator; global RNG untouched).
    """
    counts = _baseline_counts(budget, valid)
    gen = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros_like(valid)
    for p, k in enumerate(counts.tolist()):
        idx = valid[p].nonzero().flatten().cpu()
        pick = idx[torch.randperm(len(idx), generator=gen)[:k]]
        mask[p, pick.to(valid.device)] = True
    return mask


def _baseline_counts(budget, valid: torch.Tensor) -> torch.Tensor:
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a bool (P, N) tensor, got {valid.dtype} {tuple(valid.shape)}")
    P, N = valid.shape
    caps = valid.sum(dim=1).cpu()
    total = min(resolve_budget(budget, P * N), int(caps.sum()))
    return largest_remainder(total, caps.double(), caps)


def select_mask(
    selector: str,
    init_attn: torch.Tensor | None,
    final_attn: torch.Tensor | None,
    *,
    budget,
    valid: torch.Tensor,
    alpha: float = 0.5,
    grid=None,
    mode: str = "exact",
    regions: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """One entry point for every selector; returns the bool (P, N) keep-mask.

    ``full``/``spatial``/``random`` need no attention (pass None).
    """
    if selector == "hired":
        return hired_mask(init_attn, final_attn, budget=budget, alpha=alpha, grid=grid,
                          mode=mode, regions=regions, valid=valid)
    if selector == "full":
        return full_mask(valid)
    if selector == "spatial":
        return spatial_mask(budget, valid)
    if selector == "random":
        return random_mask(budget, valid, seed)
    raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
