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
  sub-image canvas and float32 unpadding; ``anyres.packed_order``).

``Hired`` registers it as the ``hired`` selector: it reads the CLS rows of l_init and
l_final and keeps a subset of the original tokens.

This module does not know transformers or Ray, does not run a model and never moves
tensors between devices: inputs and outputs live where the caller put them.
"""

from __future__ import annotations

import math
import numbers

import torch

from hired_batch.config import MODES
from hired_batch.engine.anyres import Layout, block_regions
from hired_batch.engine.selectors import MaskSelector, Needs, TowerOut, register
from hired_batch.engine.selectors.budget import largest_remainder, resolve_budget, topk_mask

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
        raise ValueError(f"grid must be (rows, cols) with rows*cols == P-1 == {P - 1}, got {grid!r}")


def _check_mask_arg(name: str, value, shape: tuple[int, int]) -> torch.Tensor | None:
    if value is None:
        return None
    if value.dtype != torch.bool or tuple(value.shape) != shape:
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape}, got dtype {value.dtype} shape {tuple(value.shape)}"
        )
    return value


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


# --------------------------------------------------------------------------- the selector


@register
class Hired(MaskSelector):
    """HiRED (``hired_mask``) on the CLS rows of l_init and l_final. ``selection.mode``:
    "exact" meets the budget to the token; "reference" sends what the published code
    sends (its masks and packing), which can fall below the planned count."""

    name = "hired"
    needs = Needs(cls_rows=("init", "final"))

    def exact(self, selection) -> bool:
        return selection.mode == "exact"

    def pack_mode(self, selection) -> str:
        return "reference" if selection.mode == "reference" else "exact"

    def mask(self, selection, layout: Layout, seen: TowerOut) -> torch.Tensor:
        return hired_mask(
            seen.cls_rows["init"],
            seen.cls_rows["final"],
            budget=selection.budget_arg,
            alpha=selection.alpha,
            grid=layout.grid,
            mode=selection.mode,
            regions=layout.region_masks(),
            valid=layout.valid_mask(),
        )
