"""Budget arithmetic every selector shares: a budget as a token count, top-k with ties
to the lower index, largest-remainder shares. Pure torch; registers no selector."""

from __future__ import annotations

import numbers

import torch


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


def capacity_counts(budget, valid: torch.Tensor) -> torch.Tensor:
    """Per-partition counts (P,): the budget split over partitions by valid-token count
    (largest remainder), as the baselines keep them."""
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a bool (P, N) tensor, got {valid.dtype} {tuple(valid.shape)}")
    P, N = valid.shape
    caps = valid.sum(dim=1).cpu()
    total = min(resolve_budget(budget, P * N), int(caps.sum()))
    return largest_remainder(total, caps.double(), caps)
