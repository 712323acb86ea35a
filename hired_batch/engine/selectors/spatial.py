"""The ``spatial`` selector: evenly spaced tokens in each partition (the paper's Spatial baseline)."""

from __future__ import annotations

import torch

from hired_batch.engine.anyres import Layout
from hired_batch.engine.selectors import MaskSelector, TowerOut, register
from hired_batch.engine.selectors.budget import capacity_counts


def spatial_mask(budget, valid: torch.Tensor) -> torch.Tensor:
    """Evenly spaced tokens in each partition (the paper's Spatial baseline).

    The exact budget is split over partitions by valid-token count (largest
    remainder); within a partition the kept tokens are evenly spaced over its
    valid tokens in raster order.
    """
    counts = capacity_counts(budget, valid)
    mask = torch.zeros_like(valid)
    for p, k in enumerate(counts.tolist()):
        idx = valid[p].nonzero().flatten()
        if k > 0:
            pick = ((torch.arange(k, dtype=torch.float64) + 0.5) * len(idx) / k).long()
            mask[p, idx[pick]] = True
    return mask


@register
class Spatial(MaskSelector):
    """``spatial_mask`` over the image's content tokens; reads nothing from the tower."""

    name = "spatial"

    def mask(self, selection, layout: Layout, seen: TowerOut) -> torch.Tensor:
        return spatial_mask(selection.budget_arg, layout.valid_mask())
