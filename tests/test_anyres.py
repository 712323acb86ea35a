"""LLaVA-NeXT anyres geometry (``engine/anyres.py``): the unpadded box, the regions of the
full image each sub-image covers, and the packed token order, stock and as the published
code packs it (reference mode)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hired_batch.engine.anyres import (
    anyres_regions,
    anyres_valid,
    block_regions,
    packed_order,
    reference_unpadded_box,
    unpadded_box,
)

GRIDS = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]  # LLaVA-NeXT's anyres grids, (rows, cols)


# --------------------------------------------------------------------------- geometry


def test_unpadded_box_and_valid_for_a_wide_image():
    # 300 (h) x 800 (w) on a 1x3 canvas of 24x72 tokens: width-limited by height,
    # new width round(800*24/300) = 64 tokens, 4 padding columns each side.
    assert unpadded_box((300, 800), (1, 3), 24) == (0, 24, 4, 68)
    v = anyres_valid((300, 800), (1, 3), 576)
    assert v.sum(dim=1).tolist() == [576, 480, 576, 480]


def test_regions_partition_the_full_image():
    for hw, grid in [((300, 800), (1, 3)), ((1000, 1000), (2, 2)), ((900, 400), (2, 1)), ((500, 300), (2, 2))]:
        r = anyres_regions(hw, grid, 576)
        assert r.shape == (grid[0] * grid[1], 576)
        assert torch.equal(r.sum(dim=0), torch.ones(576, dtype=torch.long))
    blocks = block_regions((2, 2), 16)
    assert blocks[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert blocks[3].nonzero().flatten().tolist() == [10, 11, 14, 15]
    # a square image on a square canvas: regions are the spatial blocks
    assert torch.equal(anyres_regions((1000, 1000), (2, 2), 576), block_regions((2, 2), 576))


def test_packed_order_lists_full_then_unpadded_canvas_rows():
    order = packed_order((100, 100), (1, 2), 4)  # side 2, canvas 2x4, no padding? w/h=1<2
    # content: new_w = round(100*2/100) = 2 -> pad = (4-2)//2 = 1 -> canvas cols 1..2
    # canvas row 0 = [sub0 tok0, sub0 tok1, sub1 tok0, sub1 tok1] -> cols 1,2 = sub0 tok1, sub1 tok0
    assert order.tolist() == [0, 1, 2, 3, 4 + 1, 8 + 0, 4 + 3, 8 + 2]
    assert math.prod(packed_order((5, 5), None, 9).shape) == 9


# --------------------------------------------------------------------------- reference packing


def test_reference_packing_lays_a_wide_grid_out_transposed():
    # Side 2 (N=4), grid 1x2 (one row of two sub-images), a 64x128 (h x w) image:
    # sizes with powers of two, so float32 and float64 agree exactly.
    # Stock: canvas 2x4, [sub0 | sub1], no padding -> rows of both sub-images in turn.
    assert packed_order((64, 128), (1, 2), 4).tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 6, 7, 10, 11]
    # Published: the pair (rows, cols) = (1, 2) is read as (width, height), so the
    # two sub-images are stacked as a 4x2 canvas [sub0 / sub1]; cutting it against the
    # image's 2:1 aspect keeps new_h = 64 * 2/128 = 1 row, pad (4-1)//2 = 1: canvas row
    # 1 (sub0's second row) and row 2 (sub1's first row).
    assert packed_order((64, 128), (1, 2), 4, "reference").tolist() == [0, 1, 2, 3, 6, 7, 8, 9]


def test_reference_packing_lays_a_tall_grid_out_transposed():
    # Grid 2x1 (sub0 above sub1), a 128x64 image. Published: a 2x4 canvas [sub0 | sub1];
    # the 1:2 aspect keeps new_w = 64 * 2/128 = 1 column, pad (4-1)//2 = 1: columns 1, 2.
    assert packed_order((128, 64), (2, 1), 4, "reference").tolist() == [0, 1, 2, 3, 5, 8, 7, 10]
    assert packed_order((128, 64), (2, 1), 4).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_reference_packing_of_a_1x3_image_keeps_a_middle_stripe():
    # 336x1008 on a 1x3 grid: the published canvas is 72 rows x 24 columns (sub-images
    # stacked); the 3:1 aspect keeps int(336 * 24/1008) = 8 rows, pad (72-8)//2 = 32:
    # canvas rows 32..39 = rows 8..15 of the middle sub-image (partition 2), all columns.
    order = packed_order((336, 1008), (1, 3), 576, "reference")
    want = [2 * 576 + r * 24 + c for r in range(8, 16) for c in range(24)]
    assert order.tolist() == list(range(576)) + want
    assert len(packed_order((336, 1008), (1, 3), 576)) == 576 + 3 * 576


def test_reference_unpadding_truncates_in_float32():
    # 684x1216 on a 48x48 token canvas: 684 * (48/1216) = 27.0 in float64 (rounded to
    # 7 places, stock) but 26.99999... in float32, truncated to 26: one more row cut
    # per side, 1824 sub-image tokens sent instead of 1920.
    assert unpadded_box((684, 1216), (2, 2), 24) == (10, 38, 0, 48)
    assert reference_unpadded_box((684, 1216), (48, 48)) == (11, 37, 0, 48)
    assert reference_unpadded_box((1216, 684), (48, 48)) == (0, 48, 11, 37)
    assert len(packed_order((684, 1216), (2, 2), 576, "reference")) == 576 + 26 * 48
    # where float32 does not bite, a square grid packs exactly as stock
    for hw in [(672, 672), (500, 900), (900, 500), (1000, 1000)]:
        assert torch.equal(packed_order(hw, (2, 2), 576, "reference"), packed_order(hw, (2, 2), 576))


@settings(max_examples=60, deadline=None)
@given(
    grid=st.sampled_from(GRIDS),
    h=st.integers(1, 3000),
    w=st.integers(1, 3000),
    mode=st.sampled_from(["exact", "reference"]),
)
def test_packed_order_lists_each_token_once_full_image_first(grid, h, w, mode):
    order = packed_order((h, w), grid, 576, mode)
    P = grid[0] * grid[1] + 1
    assert order[:576].tolist() == list(range(576))
    assert len(set(order.tolist())) == len(order)
    assert 0 <= int(order.min()) and int(order.max()) < P * 576
    if mode == "exact":  # stock sends exactly the content tokens
        assert sorted(order.tolist()) == anyres_valid((h, w), grid, 576).flatten().nonzero().flatten().tolist()


def test_reference_unpadding_equals_the_published_code_on_a_sweep_of_sizes():
    """The published unpad_image's boxes, recorded by tests/data/make_reference_golden.py.

    The file lists the sizes of its sweep where that code differs from float64
    rounding (``unpadded_box``); on every other size of the sweep the two agree.
    """
    import importlib.util
    import json
    import pathlib

    data = pathlib.Path(__file__).parent / "data"
    spec = importlib.util.spec_from_file_location("make_reference_golden", data / "make_reference_golden.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # its sweep_sizes(): the sizes the fork was run on
    sweep = json.loads((data / "reference_golden.json").read_text())["unpad_sweep"]
    differ = {tuple(r[:4]): tuple(r[4:]) for r in sweep["differs_from_float64"]}
    assert (684, 1216, 48, 48) in differ and len(differ) > 100
    sizes = script.sweep_sizes()
    assert len(sizes) == sweep["checked"]
    for h, w, ch, cw in sizes:
        want = differ.get((h, w, ch, cw)) or unpadded_box((h, w), (ch // 24, cw // 24), 24)
        assert reference_unpadded_box((h, w), (ch, cw)) == want, (h, w, ch, cw)
