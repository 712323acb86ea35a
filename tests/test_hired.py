"""Pure selection: hand-built attention maps with known answers, properties, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hired_batch.engine.anyres import packed_order
from hired_batch.engine.selectors import select_mask
from hired_batch.engine.selectors.budget import largest_remainder, resolve_budget, topk_mask
from hired_batch.engine.selectors.hired import hired_mask
from hired_batch.engine.selectors.random import random_mask


def published_masks(init_attn, final_attn, budget, alpha, grid):
    """An independent transcription of the published HiRED LLaVA-NeXT selection.

    Written from the rules in docs/reference-mode.md's ``--mode`` row and ``hired.py``, in the published code's own order of
    operations (Python float budget, int64 counts divided to float32, .int() floor).
    """
    P, N = init_attn.shape
    if budget >= 1.0:  # it selects only when the rate is below 1.0
        return torch.ones(P, N, dtype=torch.bool)
    mask = torch.zeros(P, N, dtype=torch.bool)
    total = int(P * N * budget)
    full_b = min(int(total * alpha), N)
    sub_b = min(total - full_b, (P - 1) * N)
    mask[0, final_attn[0].topk(full_b, largest=True).indices] = True
    if sub_b > 0:
        spatial = torch.zeros(N, dtype=torch.bool)
        spatial[init_attn[0].topk(int(N * (1 - alpha)), largest=True).indices] = True
        rows, cols = grid
        per = spatial.reshape(rows, cols, -1).sum(dim=-1).reshape(-1)
        ks = torch.clamp((per / per.sum() * sub_b).int(), max=N)
        for i, k in enumerate(ks):
            mask[i + 1, final_attn[i + 1].topk(int(k), largest=True).indices] = True
    return mask


# --------------------------------------------------------------------------- known answers


def test_single_partition_keeps_top_scores_exact_and_reference():
    final = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.4, 0.6]])
    init = torch.zeros_like(final)
    for mode in ("exact", "reference"):
        m = hired_mask(init, final, budget=3, mode=mode)
        assert m[0].nonzero().flatten().tolist() == [1, 3, 5]
    # fraction: exact rounds 9*0.5=4.5 -> 4 (banker's) ; reference floors -> 4
    assert hired_mask(init, final, budget=0.5)[0].sum() == round(4.5)
    assert hired_mask(init, final, budget=0.5, mode="reference")[0].sum() == 4
    # 9 * 0.6 = 5.4 -> 5 either way; 9 * 0.7 = 6.3 -> 6
    assert hired_mask(init, final, budget=0.7)[0].nonzero().flatten().tolist() == [1, 2, 3, 5, 7, 8]


def test_ties_go_to_the_lower_index_in_exact_mode():
    final = torch.ones(1, 16)
    m = hired_mask(torch.zeros(1, 16), final, budget=5)
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_exact_mode_budget_follows_the_attention_in_each_region():
    # N = 16 (4x4 full grid), grid 2x2: the top-left block of the full image holds
    # all l_init attention, so sub-image 1 (top-left) takes the whole sub budget.
    P, N = 5, 16
    init = torch.zeros(P, N)
    init[0, [0, 1, 4, 5]] = 1.0  # top-left 2x2 block of the 4x4 full grid
    final = torch.arange(P * N, dtype=torch.float32).reshape(P, N)
    m = hired_mask(init, final, budget=16, alpha=0.5, grid=(2, 2))
    assert m.sum(dim=1).tolist() == [8, 8, 0, 0, 0]
    # top-8 by final score in each partition = the highest indices
    assert m[0].nonzero().flatten().tolist() == list(range(8, 16))
    assert m[1].nonzero().flatten().tolist() == list(range(8, 16))


def test_exact_mode_largest_remainder_split():
    P, N = 5, 16
    init = torch.zeros(P, N)
    init[0, 0] = 3.0  # region 1 (top-left)
    init[0, 2] = 2.0  # region 2 (top-right)
    init[0, 8] = 1.0  # region 3 (bottom-left)
    final = torch.rand(P, N, generator=torch.Generator().manual_seed(1))
    m = hired_mask(init, final, budget=20, alpha=0.5, grid=(2, 2))
    # full 10; subs 10 * (3,2,1,0)/6 = 5, 3.33, 1.67, 0 -> 5, 3, 2, 0 (largest remainder)
    assert m.sum(dim=1).tolist() == [10, 5, 3, 2, 0]


def test_exact_mode_caps_redistribute_and_padding_is_never_kept():
    P, N = 5, 16
    init = torch.zeros(P, N)
    init[0, 0] = 1.0
    final = torch.rand(P, N, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(P, N, dtype=torch.bool)
    valid[1, 6:] = False  # sub-image 1 has only 6 content tokens
    m = hired_mask(init, final, budget=30, alpha=0.5, grid=(2, 2), valid=valid)
    assert m.sum() == 30
    assert m.sum(dim=1)[1] == 6  # capped
    assert not (m & ~valid).any()
    # the 9 that did not fit go to the other sub-images by capacity (no weight left)
    assert m.sum(dim=1).tolist() == [15, 6, 3, 3, 3]


def test_exact_mode_gives_overflow_back_to_the_full_image():
    P, N = 3, 4
    valid = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    init = torch.rand(P, N)
    m = hired_mask(
        init,
        torch.rand(P, N),
        budget=5,
        alpha=0.0,
        grid=(1, 2),
        valid=valid,
        regions=torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool),
    )
    assert m.sum(dim=1).tolist() == [4, 1, 0]


def test_reference_mode_uses_raster_stripes_and_floors():
    # N = 16, grid 2x2 -> stripes of 4 consecutive raster tokens; alpha 0.5 marks the
    # 8 best l_init tokens: put 4 in stripe 0 (row 0), 4 in stripe 3 (row 3).
    P, N = 5, 16
    init = torch.zeros(P, N)
    init[0, [0, 1, 2, 3, 12, 13, 14, 15]] = 1.0 + torch.arange(8) / 10
    final = torch.rand(P, N, generator=torch.Generator().manual_seed(3))
    m = hired_mask(init, final, budget=0.3, alpha=0.5, grid=(2, 2), mode="reference")
    # total = int(80*0.3) = 24, full = 12, sub = 12 -> (0.5*12, 0, 0, 0.5*12)
    assert m.sum(dim=1).tolist() == [12, 6, 0, 0, 6]
    # exact mode weighs spatial blocks: block sums 2.1, 2.5, 2.9, 3.3 of 10.8 ->
    # quotas 2.33, 2.78, 3.22, 3.67 -> floors 2,2,3,3 + the two largest remainders
    e = hired_mask(init, final, budget=24, alpha=0.5, grid=(2, 2))
    assert e.sum(dim=1).tolist() == [12, 2, 3, 3, 4]


def test_reference_mode_matches_published_rules_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        rows, cols = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)][trial % 5]
        P, N = rows * cols + 1, 576
        init = torch.rand(P, N, generator=gen) ** 4
        final = torch.rand(P, N, generator=gen) ** 4
        budget = [0.05, 0.1, 0.2, 0.25, 0.4, 0.5, 0.77, 1.0][trial % 8]
        alpha = [0.5, 0.3, 0.7, 0.9, 0.0][trial % 5]
        ours = hired_mask(init, final, budget=budget, alpha=alpha, grid=(rows, cols), mode="reference")
        assert torch.equal(ours, published_masks(init, final, budget, alpha, (rows, cols)))


def test_reference_mode_budget_can_fall_below_target_by_floors():
    P, N = 5, 576
    gen = torch.Generator().manual_seed(5)
    init, final = torch.rand(P, N, generator=gen), torch.rand(P, N, generator=gen)
    m = hired_mask(init, final, budget=0.2, grid=(2, 2), mode="reference")
    assert m.sum() <= int(P * N * 0.2)
    e = hired_mask(init, final, budget=0.2, grid=(2, 2))
    assert e.sum() == round(P * N * 0.2)


# --------------------------------------------------------------------------- baselines


def test_full_spatial_random_selectors():
    P, N = 3, 16
    valid = torch.ones(P, N, dtype=torch.bool)
    valid[2, 8:] = False
    full = select_mask("full", None, None, budget=1.0, valid=valid)
    assert torch.equal(full, valid)
    sp = select_mask("spatial", None, None, budget=10, valid=valid)
    assert sp.sum() == 10 and not (sp & ~valid).any()
    assert sp.sum(dim=1).tolist() == [4, 4, 2]  # by valid count 16:16:8
    assert sp[0].nonzero().flatten().tolist() == [2, 6, 10, 14]  # evenly spaced
    r1 = random_mask(10, valid, seed=7)
    assert torch.equal(r1, random_mask(10, valid, seed=7))
    assert not torch.equal(r1, random_mask(10, valid, seed=8))
    assert r1.sum(dim=1).tolist() == [4, 4, 2] and not (r1 & ~valid).any()
    with pytest.raises(ValueError, match="selector must be one of"):
        select_mask("oracle", None, None, budget=1.0, valid=valid)


# --------------------------------------------------------------------------- properties


@st.composite
def attention_case(draw):
    rows = draw(st.integers(1, 3))
    cols = draw(st.integers(1, 3))
    single = draw(st.booleans())
    side = draw(st.sampled_from([2, 3, 4, 6]))
    N = side * side
    P = 1 if single else rows * cols + 1
    grid = None if single else (rows, cols)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    init = torch.rand(P, N, generator=gen)
    final = torch.rand(P, N, generator=gen)
    if draw(st.booleans()):
        final = (final * 4).round()  # many ties
    valid = torch.rand(P, N, generator=gen) > draw(st.floats(0.0, 0.6))
    valid[0] = True
    budget = draw(st.one_of(st.floats(0.01, 1.0), st.integers(1, P * N + 5)))
    alpha = draw(st.floats(0.0, 1.0))
    return init, final, valid, budget, alpha, grid


@settings(max_examples=150, deadline=None)
@given(attention_case())
def test_exact_mode_properties(case):
    init, final, valid, budget, alpha, grid = case
    P, N = init.shape
    m = hired_mask(init, final, budget=budget, alpha=alpha, grid=grid, valid=valid)
    assert m.dtype == torch.bool and m.shape == (P, N)
    # exact count, unless fewer valid tokens exist
    assert int(m.sum()) == min(resolve_budget(budget, P * N), int(valid.sum()))
    assert not (m & ~valid).any()
    # top-k within each partition: no dropped valid token outranks a kept one
    for p in range(P):
        kept = final[p][m[p]]
        dropped = final[p][valid[p] & ~m[p]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()
            # ties resolved to the lower index
            tie = kept.min()
            tied_dropped = (valid[p] & ~m[p] & (final[p] == tie)).nonzero()
            tied_kept = (m[p] & (final[p] == tie)).nonzero()
            if len(tied_dropped) and len(tied_kept):
                assert tied_kept.max() < tied_dropped.min()
    assert torch.equal(m, hired_mask(init, final, budget=budget, alpha=alpha, grid=grid, valid=valid))


@settings(max_examples=100, deadline=None)
@given(attention_case())
def test_baseline_properties(case):
    _, _, valid, budget, _, _ = case
    P, N = valid.shape
    want = min(resolve_budget(budget, P * N), int(valid.sum()))
    for sel in ("spatial", "random"):
        m = select_mask(sel, None, None, budget=budget, valid=valid, seed=3)
        assert int(m.sum()) == want
        assert not (m & ~valid).any()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.lists(st.floats(0, 5), min_size=1, max_size=8), st.data())
def test_largest_remainder_properties(total, weights, data):
    caps = torch.tensor(data.draw(st.lists(st.integers(0, 60), min_size=len(weights), max_size=len(weights))))
    shares = largest_remainder(total, torch.tensor(weights), caps)
    assert int(shares.sum()) == min(total, int(caps.sum()))
    assert (shares <= caps).all() and (shares >= 0).all()


def test_topk_mask_respects_valid():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0])
    v = torch.tensor([False, True, True, True])
    assert topk_mask(s, 2, v).tolist() == [False, True, True, False]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=0.0), "budget must be"),
        (dict(budget=1.5), "budget must be"),
        (dict(budget=-3), "token count must be >= 1"),
        (dict(budget=True), "budget must be"),
        (dict(budget=0.2, alpha=1.2), "alpha must be in"),
        (dict(budget=0.2, alpha=-0.1), "alpha must be in"),
        (dict(budget=0.2, grid=(1, 3)), r"rows\*cols == P-1 == 4"),
        (dict(budget=0.2, grid=None), "grid must be"),
        (dict(budget=0.2, mode="paper"), "mode must be one of"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    init = torch.rand(5, 16)
    kwargs.setdefault("grid", (2, 2))
    with pytest.raises(ValueError, match=match):
        hired_mask(init, torch.rand(5, 16), **kwargs)


def test_shape_errors_say_what_was_found():
    with pytest.raises(ValueError, match=r"got \(5, 16\) and \(5, 9\)"):
        hired_mask(torch.rand(5, 16), torch.rand(5, 9), budget=0.2, grid=(2, 2))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        hired_mask(
            torch.rand(5, 16), torch.rand(5, 16), budget=0.2, grid=(2, 2), valid=torch.ones(5, 15, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="grid must be None"):
        hired_mask(torch.rand(1, 16), torch.rand(1, 16), budget=0.2, grid=(1, 1))


def test_reference_mode_at_full_budget_keeps_every_token():
    init, final = torch.rand(4, 576), torch.rand(4, 576)
    assert hired_mask(init, final, budget=1.0, grid=(1, 3), mode="reference").all()
    with pytest.raises(ValueError, match="mode must be one of"):
        packed_order((10, 10), (1, 2), 4, "paper")


def test_numpy_scalars_are_accepted_as_budgets():
    import numpy as np

    init, final = torch.rand(5, 16), torch.rand(5, 16)
    assert hired_mask(init, final, budget=np.int64(7), grid=(2, 2)).sum() == 7
    assert hired_mask(init, final, budget=np.float32(0.25), grid=(2, 2)).sum() == 20
    assert hired_mask(init, final, budget=np.float64(0.25), grid=(2, 2), mode="reference").sum() <= 20
