"""The ``full`` selector: stock LLaVA, every content token, image-newlines included.

The baseline every pruning method is measured against; the parity tests compare it
with stock transformers and stock vLLM token for token.
"""

from __future__ import annotations

import torch

from hired_batch.engine.anyres import Layout
from hired_batch.engine.selectors import MaskSelector, Tokens, TowerOut, register


def full_mask(valid: torch.Tensor) -> torch.Tensor:
    """Keep every token that holds image content (stock LLaVA)."""
    return valid.clone()


@register
class Full(MaskSelector):
    """Sends what stock LLaVA sends, in its order; ignores the budget."""

    name = "full"
    stock = True

    def count(self, selection, layout: Layout) -> int:
        return layout.stock_tokens()

    def mask(self, selection, layout: Layout, seen: TowerOut) -> torch.Tensor:
        return full_mask(layout.valid_mask())

    def select(self, selection, layout: Layout, seen: TowerOut) -> Tokens:
        return Tokens(layout.stock_order(), self.mask(selection, layout, seen))
