"""The shared token plan (``token_plan``) and the CLS-row hooks on a fused qkv projection.

Pure: no checkpoint. The counts are checked against the geometry that packs the
tokens (``anyres.packed_order``, ``anyres.anyres_valid``) and against the masks
``keep_mask`` actually builds, for every anyres grid and several budgets.
"""

import pytest
import torch

from hired_batch.config import SelectionConfig
from hired_batch.engine import anyres, token_plan
from hired_batch.engine.tiny import GRID_PINPOINTS, IMAGE_SIZE, PATCH_SIZE
from hired_batch.engine.vision import ClsAttentionHooks

N = (IMAGE_SIZE // PATCH_SIZE) ** 2
NEXT = token_plan.Geometry(n_tokens=N, crop_px=IMAGE_SIZE, pinpoints=tuple(map(tuple, GRID_PINPOINTS)))
LLAVA = token_plan.Geometry(n_tokens=N, crop_px=IMAGE_SIZE, pinpoints=None, newline=False)
# (height, width): 2x1, 1x2, 2x2, 3x1, 1x3 crops, and odd aspect ratios (padding rows)
SIZES = [(672, 336), (336, 672), (600, 600), (1000, 300), (300, 1000), (100, 120), (333, 500), (479, 640)]


@pytest.mark.parametrize("size", SIZES)
def test_full_count_is_the_packed_order_plus_one_newline_per_row(size):
    grid = token_plan.grid_of(size, NEXT)
    order = anyres.packed_order(size, grid, N)
    top, bottom, _, _ = anyres.unpadded_box(size, grid, anyres.grid_side(N))
    assert token_plan.full_count(size, NEXT) == len(order) + (bottom - top)
    assert token_plan.content_tokens(size, NEXT) == len(order) == int(anyres.anyres_valid(size, grid, N).sum())
    assert token_plan.n_parts(grid) == grid[0] * grid[1] + 1


@pytest.mark.parametrize("selector", ["hired", "spatial", "random"])
@pytest.mark.parametrize(
    "opts",
    [dict(budget=0.05), dict(budget=0.2), dict(budget=1.0), dict(budget_tokens=100), dict(budget=0.4, alpha=0.9)],
)
def test_visual_tokens_equal_what_keep_mask_keeps(selector, opts):
    sel = SelectionConfig(selector=selector, **opts)
    gen = torch.Generator().manual_seed(0)
    for geo, sizes in ((NEXT, SIZES), (LLAVA, [(500, 333)])):
        for size in sizes:
            P = token_plan.n_parts(token_plan.grid_of(size, geo))
            init, final = torch.rand(P, N, generator=gen), torch.rand(P, N, generator=gen)
            mask = token_plan.keep_mask(sel, init, final, size, geo)
            assert int(mask.sum()) == token_plan.visual_tokens(size, sel, geo), (geo, size)


def test_a_token_count_budget_gives_the_same_mask_as_its_fraction():
    """The vLLM plugin sends each image's planned count as ``budget_tokens``: same masks."""
    gen = torch.Generator().manual_seed(1)
    for size in SIZES:
        P = token_plan.n_parts(token_plan.grid_of(size, NEXT))
        init, final = torch.rand(P, N, generator=gen), torch.rand(P, N, generator=gen)
        frac = SelectionConfig(budget=0.3, alpha=0.7)
        count = SelectionConfig(budget_tokens=token_plan.visual_tokens(size, frac, NEXT), alpha=0.7)
        assert torch.equal(
            token_plan.keep_mask(frac, init, final, size, NEXT), token_plan.keep_mask(count, init, final, size, NEXT)
        )


class _Split(torch.nn.Module):
    """q_proj / k_proj / v_proj, as transformers' CLIP has them."""

    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, d) for _ in range(3))
        self.scale = (d // 4) ** -0.5

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class _Fused(torch.nn.Module):
    """One qkv_proj returning (output, bias), as vLLM's CLIP has it, with ``split``'s weights."""

    def __init__(self, split):
        super().__init__()
        d = split.q_proj.in_features
        self.qkv_proj = _ReturnsBias(torch.nn.Linear(d, 3 * d))
        with torch.no_grad():
            self.qkv_proj.linear.weight.copy_(
                torch.cat([split.q_proj.weight, split.k_proj.weight, split.v_proj.weight])
            )
            self.qkv_proj.linear.bias.copy_(torch.cat([split.q_proj.bias, split.k_proj.bias, split.v_proj.bias]))
        self.scale = split.scale

    def forward(self, x):
        return self.qkv_proj(x)


class _ReturnsBias(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x), None


def test_cls_rows_from_a_fused_qkv_projection_equal_the_split_ones():
    torch.manual_seed(0)
    split = _Split(32)
    x = torch.randn(3, 1 + N, 32)
    rows = {}
    for name, attn in (("split", split), ("fused", _Fused(split))):
        layer = torch.nn.Module()
        layer.self_attn = attn
        hooks = ClsAttentionHooks([layer], [0], num_heads=4)
        attn(x)
        hooks.remove()
        rows[name] = hooks.rows[0]
    assert rows["fused"].shape == (3, N)
    torch.testing.assert_close(rows["fused"], rows["split"], rtol=1e-5, atol=1e-7)


def test_select_best_resolution_matches_transformers_over_a_sweep():
    """The token plan owns the anyres choice without importing transformers; it must
    pick what transformers' own function picks (the processor resizes with that one)."""
    from transformers.image_processing_utils import select_best_resolution as reference

    from hired_batch.engine.dims import ANYRES_PINPOINTS

    sizes = [(h, w) for h in range(1, 2100, 37) for w in range(1, 2100, 41)]
    sizes += [(672, 672), (480, 640), (640, 480), (1008, 336), (300, 1100), (1, 1000), (2000, 50)]
    for pins in (ANYRES_PINPOINTS, GRID_PINPOINTS):
        for hw in sizes:
            assert token_plan.select_best_resolution(hw, pins) == tuple(reference(list(hw), [list(p) for p in pins])), (
                hw
            )


def test_max_patch_tokens_is_what_the_largest_image_gets():
    """The ceiling of a token budget: no image of any size gets more crops x patches."""
    sizes = SIZES + [(h, w) for h in (200, 336, 700, 1008, 2000) for w in (200, 336, 700, 1008, 2000)]
    most = max(token_plan.n_parts(token_plan.grid_of(s, NEXT)) for s in sizes) * N
    assert token_plan.max_patch_tokens(NEXT) == most == 5 * N  # the 2x2 grid: 1 + 4 crops
    assert token_plan.largest_grid(NEXT) == (2, 2)
    assert token_plan.max_patch_tokens(LLAVA) == N and token_plan.largest_grid(LLAVA) is None
    # a budget at the ceiling keeps every content token of the largest image, one above it no more
    full = SelectionConfig(budget_tokens=token_plan.max_patch_tokens(NEXT))
    assert token_plan.visual_tokens((672, 672), full, NEXT) == token_plan.content_tokens((672, 672), NEXT) == 5 * N
