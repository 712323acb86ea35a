"""The token plan: how many visual tokens an image sends, from its size and the selection alone.

The count itself is the selector's (``selectors.get(name).count``); this module gives it
the image's ``anyres.Layout`` from the checkpoint's geometry. Every backend asks this
one module: the HF engine (``HiredEngine.planned_count``) to size batches before vision
runs, and the vLLM plugin (``hired_batch.engine.vllm``) to place image placeholders
before the model runs. Both must agree with what the vision pass then sends
(``selectors.select`` checks it), so the count has exactly one owner.

Pure: no model, no weights; reads only the checkpoint's geometry (``Geometry``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.config import SelectionConfig
from hired_batch.engine import selectors
from hired_batch.engine.anyres import Layout
from hired_batch.engine.dims import ANYRES_PINPOINTS, ItemTokens, ModelDims


@dataclass(frozen=True)
class Geometry:
    """The token geometry of a LLaVA checkpoint (what the count depends on besides the image)."""

    n_tokens: int  # patch tokens per crop, CLS excluded (576 for CLIP-L/14 at 336 px)
    crop_px: int  # side of one square crop in pixels (336)
    pinpoints: tuple | None  # LLaVA-NeXT anyres canvases ((h, w) px, ...); None = LLaVA-1.5, one crop
    newline: bool = True  # stock LLaVA-NeXT sends an image-newline token after each unpadded row

    @classmethod
    def from_config(cls, cfg) -> "Geometry":
        """Geometry of a transformers LLaVA / LLaVA-NeXT config (``model.config``)."""
        vcfg = cfg.vision_config
        is_next = cfg.model_type == "llava_next"
        pins = tuple(tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints) if is_next else None
        return cls(
            n_tokens=(vcfg.image_size // vcfg.patch_size) ** 2,
            crop_px=int(vcfg.image_size),
            pinpoints=pins,
            newline=is_next,
        )

    @classmethod
    def from_dims(cls, d: ModelDims, pinpoints=ANYRES_PINPOINTS) -> "Geometry":
        """Geometry of a model known only by its sizes (the ideal model, the bench's presets):
        LLaVA-NeXT's anyres ``pinpoints`` when ``d.is_next``, else one crop."""
        pins = tuple(tuple(int(v) for v in p) for p in pinpoints) if d.is_next else None
        return cls(n_tokens=d.n_patches, crop_px=d.image_size, pinpoints=pins, newline=d.is_next)


def select_best_resolution(image_size, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's anyres canvas (height, width) for an image of (height, width): the
    pinpoint that keeps the most image pixels after an aspect-preserving downscale, the
    least wasted canvas on a tie (the rule of transformers' function of the same name,
    which tests compare over a sweep of sizes)."""
    h0, w0 = int(image_size[0]), int(image_size[1])
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def grid_of(image_size, geo: Geometry) -> tuple[int, int] | None:
    """Anyres (rows, cols) of crops for an image of (height, width); None for LLaVA-1.5."""
    if geo.pinpoints is None:
        return None
    h, w = select_best_resolution(image_size, geo.pinpoints)
    return h // geo.crop_px, w // geo.crop_px


def n_parts(grid) -> int:
    """Crops P the vision tower sees: the full image plus rows*cols sub-images."""
    return 1 if grid is None else grid[0] * grid[1] + 1


def largest_grid(geo: Geometry) -> tuple[int, int] | None:
    """The anyres (rows, cols) with the most crops any image can get; None for LLaVA-1.5."""
    if geo.pinpoints is None:
        return None
    return max(((h // geo.crop_px, w // geo.crop_px) for h, w in geo.pinpoints), key=lambda g: g[0] * g[1])


def max_patch_tokens(geo: Geometry) -> int:
    """The most patch tokens any image's crops hold (the largest grid's P * N): a token
    budget above it keeps every token of every image."""
    return n_parts(largest_grid(geo)) * geo.n_tokens


def layout(image_size, geo: Geometry) -> Layout:
    """The ``anyres.Layout`` of an image of (height, width): what its selector knows of it."""
    return Layout(tuple(int(v) for v in image_size), grid_of(image_size, geo), geo.n_tokens, newline=geo.newline)


def content_tokens(image_size, geo: Geometry) -> int:
    """Patch tokens holding image content: the full-image crop plus the unpadded canvas."""
    return layout(image_size, geo).content_tokens()


def full_count(image_size, geo: Geometry) -> int:
    """Visual tokens stock LLaVA sends for the image (image-newline tokens included)."""
    return layout(image_size, geo).stock_tokens()


def visual_tokens(image_size, selection: SelectionConfig, geo: Geometry) -> int:
    """Visual tokens ``selection`` sends for an image of (height, width), known before vision:
    its selector's ``count``.

    Exact for full/spatial/random/hired-exact; an upper bound for hired's reference
    mode, whose floors and padding drops can only lower it (its transposed canvas can
    hold more tokens than the real geometry: 1200 vs 1104 at 300x270).
    """
    return selectors.get(selection.selector).count(selection, layout(image_size, geo))


def item_tokens(image_size, selection: SelectionConfig, geo: Geometry, n_prompt_ids: int) -> ItemTokens:
    """One item's token counts before it runs: crops through the tower, visual tokens
    sent (``visual_tokens``), text tokens (the prompt's ids less its one ``<image>``
    placeholder) and, for a stock selector (``full``), the tokens through the projector.
    The generation stage sizes batches with it and the bench feeds it to the cost model."""
    n_crops = n_parts(grid_of(image_size, geo))
    stock = selectors.get(selection.selector).stock
    return ItemTokens(
        n_crops=n_crops,
        n_visual=visual_tokens(image_size, selection, geo),
        n_text=int(n_prompt_ids) - 1,
        n_projected=n_crops * geo.n_tokens if stock else None,
    )


def keep_mask(selection: SelectionConfig, init_rows, final_rows, image_size, geo: Geometry):
    """Bool (P, N) keep-mask of one image: ``selection`` applied to its CLS-attention rows.

    ``init_rows``/``final_rows``: (P, N) CLS->patch attention at l_init / l_final;
    only selectors whose ``needs`` name them read them (others may pass None). The
    mask keeps exactly ``visual_tokens`` tokens in exact mode (never a newline: those
    are stock LLaVA-NeXT's, sent by the ``full`` selector only).
    """
    seen = selectors.TowerOut(cls_rows={"init": init_rows, "final": final_rows})
    return selectors.get(selection.selector).select(selection, layout(image_size, geo), seen).mask
