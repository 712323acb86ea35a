"""The ``random`` selector: uniformly random content tokens, as many per partition as ``spatial``."""

from __future__ import annotations

import torch

from hired_batch.engine.anyres import Layout
from hired_batch.engine.selectors import MaskSelector, TowerOut, register
from hired_batch.engine.selectors.budget import capacity_counts


def random_mask(budget, valid: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniformly random valid tokens, same per-partition counts as ``spatial_mask``.

    Deterministic for a given seed (a private CPU generator; global RNG untouched).
    """
    counts = capacity_counts(budget, valid)
    gen = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros_like(valid)
    for p, k in enumerate(counts.tolist()):
        idx = valid[p].nonzero().flatten().cpu()
        pick = idx[torch.randperm(len(idx), generator=gen)[:k]]
        mask[p, pick.to(valid.device)] = True
    return mask


@register
class Random(MaskSelector):
    """``random_mask`` with ``selection.seed``; reads nothing from the tower."""

    name = "random"

    def mask(self, selection, layout: Layout, seen: TowerOut) -> torch.Tensor:
        return random_mask(selection.budget_arg, layout.valid_mask(), selection.seed)
