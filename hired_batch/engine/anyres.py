"""LLaVA-NeXT's anyres geometry in token units: which tokens of an image hold content,
which full-image tokens cover each sub-image, in which order the unpadded grid is sent.

An image of (height, width) is cut into P = 1 + rows*cols crops of N = side*side patch
tokens: the whole image squashed to one crop (partition 0), then the sub-images of the
anyres canvas in row-major order. ``Layout`` bundles one image's geometry for the
selectors (``hired_batch.engine.selectors``), which know an image only through it.

This module does not know transformers, vLLM or Ray and runs no model; it does not
choose the canvas (``token_plan.grid_of`` does, from the checkpoint's pinpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from hired_batch.config import MODES

NEWLINE = -1  # in a list of sent token indices: LLaVA-NeXT's learned image-newline vector


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
    canvas = sub_image_canvas((rows, cols), n_tokens)
    return torch.cat([torch.arange(n_tokens), canvas[top:bottom, left:right].reshape(-1)])


def sub_image_canvas(grid, n_tokens: int) -> torch.Tensor:
    """(rows * side, cols * side) flat p*N+j indices of the sub-images laid out on their
    ``grid`` (rows, cols), before any unpadding: a raster walk crosses every sub-image of
    a canvas row."""
    side = grid_side(n_tokens)
    rows, cols = grid
    flat = torch.arange(rows * cols * n_tokens).view(rows, cols, side, side) + n_tokens
    return flat.permute(0, 2, 1, 3).reshape(rows * side, cols * side)


def sent_indices(mask, image_size, grid, n_tokens: int, mode: str = "exact") -> torch.Tensor:
    """Flat p*N+j indices of the tokens ``mask`` keeps, in the order a backend sends them
    (``packed_order`` in ``mode``'s geometry). ``mask``: bool (P, N)."""
    order = packed_order(image_size, grid, n_tokens, mode)
    return order[mask.flatten().cpu()[order]]  # CPU: the mask is tiny


def with_newlines(order: torch.Tensor, image_size, grid, n_tokens: int) -> torch.Tensor:
    """``order`` (stock packing: full image, then the whole unpadded canvas) with a
    ``NEWLINE`` slot after each canvas row, as stock LLaVA-NeXT sends it."""
    top, bottom, left, right = unpadded_box(image_size, grid, grid_side(n_tokens))
    base, rows = order[:n_tokens], order[n_tokens:].view(bottom - top, right - left)
    nl = torch.full((bottom - top, 1), NEWLINE, dtype=order.dtype)
    return torch.cat([base, torch.cat([rows, nl], dim=1).flatten()])


@dataclass
class Layout:
    """One image's token geometry, all a selector knows of the image besides the tower's outputs.

    ``valid`` and ``regions`` are computed from the geometry on first use unless given
    (tests give hand-made masks, with ``image_size`` None).
    """

    image_size: tuple | None  # (height, width) px; None when valid/regions are given by hand
    grid: tuple | None  # anyres (rows, cols) of sub-images; None: one crop (LLaVA-1.5)
    n_tokens: int  # N, patch tokens per crop (576 for CLIP-L/14 at 336 px)
    newline: bool = False  # stock LLaVA-NeXT sends an image-newline token after each canvas row
    valid: torch.Tensor | None = None  # (P, N) bool: tokens that hold image content
    regions: torch.Tensor | None = None  # (P-1, N) bool: full-image tokens covering each sub-image

    @property
    def n_parts(self) -> int:
        """P, crops through the tower: the full image plus rows*cols sub-images."""
        return 1 if self.grid is None else self.grid[0] * self.grid[1] + 1

    def valid_mask(self) -> torch.Tensor:
        """(P, N) bool: True where a token holds image content (``anyres_valid``)."""
        if self.valid is None:
            if self.grid is None or self.image_size is None:
                self.valid = torch.ones(self.n_parts, self.n_tokens, dtype=torch.bool)
            else:
                self.valid = anyres_valid(self.image_size, self.grid, self.n_tokens)
        return self.valid

    def region_masks(self) -> torch.Tensor | None:
        """(P-1, N) bool regions of the real geometry (``anyres_regions``); None for one
        crop, or without an image size (HiRED then uses ``block_regions``)."""
        if self.regions is None and self.grid is not None and self.image_size is not None:
            self.regions = anyres_regions(self.image_size, self.grid, self.n_tokens)
        return self.regions

    def packed_order(self, mode: str = "exact") -> torch.Tensor:
        """``packed_order`` of this image: every token ``mode``'s packing can send, in order."""
        return packed_order(self.image_size, self.grid, self.n_tokens, mode)

    def content_tokens(self) -> int:
        """Patch tokens holding image content: the full-image crop plus the unpadded canvas."""
        if self.grid is None:
            return self.n_tokens
        top, bottom, left, right = unpadded_box(self.image_size, self.grid, grid_side(self.n_tokens))
        return self.n_tokens + (bottom - top) * (right - left)

    def sendable(self, mode: str = "exact") -> int:
        """Tokens the packing of ``mode`` can send at most (the unpadded canvas it keeps)."""
        if mode == "exact" or self.grid is None:
            return self.content_tokens()
        return len(self.packed_order(mode))

    def stock_tokens(self) -> int:
        """Visual tokens stock LLaVA sends: every content token, plus a newline per canvas row."""
        if self.grid is None or not self.newline:
            return self.content_tokens()
        top, bottom, _, _ = unpadded_box(self.image_size, self.grid, grid_side(self.n_tokens))
        return self.content_tokens() + (bottom - top)

    def stock_order(self) -> torch.Tensor:
        """The indices stock LLaVA sends, in its order (``NEWLINE`` slots included)."""
        order = self.packed_order("exact")
        if self.grid is None or not self.newline:
            return order
        return with_newlines(order, self.image_size, self.grid, self.n_tokens)
