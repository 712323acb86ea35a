"""VisionZip: the rule on one partition, the tokens sent and their count on the HF engine,
the published code's tokens and answers (golden file), the fail-fast before Ray."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support.cli import run_before_ray
from support.golden import golden_checkpoint, golden_file, golden_script
from support.images import noise_images

from hired_batch.config import ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.engine.selectors import NEW, TowerOut
from hired_batch.engine.selectors.visionzip import VisionZip, partition_tokens, split, zip_partition
from hired_batch.engine.token_plan import Geometry, layout, visual_tokens
from hired_batch.engine.weights import load_llava

# one image per anyres grid of the tiny checkpoint: 1x2, 2x1, 2x2, 1x3, 3x1
GRID_SIZES = [(336, 672), (672, 336), (500, 900), (336, 1008), (1008, 336)]


# --------------------------------------------------------------------------- the rule


def _loop_rule(scores, keys, states, tokens):
    """VisionZip on one partition written as plain loops (the paper's words), to check
    ``zip_partition``'s tensor code against."""
    d, c = split(tokens)
    ranked = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    dominant = sorted(ranked[: d - 1])
    rest = [i for i in range(len(scores)) if i not in set(dominant)]
    unit = {i: keys[i] / keys[i].norm() for i in rest}
    step = max(1, len(rest) // c) if c else 1
    targets = [rest[t] for t in range(0, len(rest), step)][:c]
    joined = {t: [] for t in targets}
    for i in rest:
        if targets and i not in joined:
            joined[max(targets, key=lambda t: float(unit[i] @ unit[t]))].append(i)
    merged = [states[t] + (sum(states[i] for i in joined[t]) / len(joined[t]) if joined[t] else 0) for t in targets]
    return dominant, targets, torch.stack(merged) if merged else None


@pytest.mark.parametrize("tokens", [2, 7, 58, 115, 288, 576])
def test_zip_partition_is_the_rule(tokens):
    g = torch.Generator().manual_seed(tokens)
    scores, keys, states = (
        torch.rand(576, generator=g),
        torch.randn(576, 4, generator=g),
        torch.randn(576, 8, generator=g),
    )
    z = zip_partition(scores, keys, states, tokens)
    dominant, targets, merged = _loop_rule(scores, keys, states, tokens)
    assert z.dominant.tolist() == dominant
    assert z.targets.tolist() == targets
    assert len(z.dominant) + 1 + len(z.contextual) == tokens  # the CLS is the D-th dominant token
    if targets:
        assert torch.allclose(z.contextual, merged, atol=1e-5)
    # every patch is dominant (-1) or in exactly one contextual token (none without contextual tokens)
    assert sorted(set(z.groups[z.dominant].tolist())) == ([-1] if dominant else [])
    assert int((z.groups >= 0).sum()) == (576 - len(dominant) if targets else 0)


def test_split_keeps_the_papers_ratio_and_budgets_share_the_crops():
    assert [split(t) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]  # the paper's settings
    assert partition_tokens(0.2, "reference", 5, 576) == [115] * 5  # every crop the same, as published
    assert partition_tokens(0.2, "exact", 5, 576) == [116, 115, 115, 115, 115]  # round(0.2 * 5 * 576) = 576
    assert partition_tokens(300, "reference", 3, 576) == [100] * 3
    assert partition_tokens(301, "exact", 3, 576) == [101, 100, 100]
    with pytest.raises(ConfigError, match="at least 2 tokens per crop"):
        partition_tokens(9, "exact", 5, 576)


def test_visionzip_contextual_sets_the_merged_share_and_keeps_the_count():
    """``--visionzip-contextual``: C is that share of each crop's tokens (at least the CLS and
    one patch stay dominant); the count sent, and so the token plan, does not change."""
    assert split(64, 0.25) == (48, 16) and split(64, 0.0) == (64, 0) and split(4, 0.9) == (2, 2)
    g = torch.Generator().manual_seed(1)
    P, N = 3, 16
    seen = TowerOut(
        torch.randn(P, N, 8, generator=g),
        {"final": torch.rand(P, N, generator=g)},
        {"final": torch.randn(P, N, 4, generator=g)},
        torch.randn(P, 8, generator=g),
    )
    lay = layout((336, 672), Geometry(N, 336, ((336, 672),), newline=True))
    base = SelectionConfig(selector="visionzip", mode="reference", budget_tokens=3 * 12)
    for share, merged in ((None, 3 * split(12)[1]), (0.5, 3 * 6), (0.0, 0)):
        sel = replace(base, visionzip_contextual=share)
        t = VisionZip().select(sel, lay, seen)
        assert len(t.indices) == VisionZip().count(sel, lay) == 36
        assert int((t.indices == NEW).sum()) == P + merged  # a CLS per crop and the merged tokens
    with pytest.raises(ConfigError, match="visionzip_contextual must be a share in"):
        SelectionConfig(selector="visionzip", visionzip_contextual=1.0).check()


def test_tokens_sent_in_the_published_order():
    """Full image: CLS, dominant, contextual; then the sub-images' dominant patches on the
    canvas (raster, no unpadding), their CLS tokens, their contextual tokens crop by crop."""
    g = torch.Generator().manual_seed(0)
    P, N = 3, 16  # 1x2 grid of 4x4-token crops
    seen = TowerOut(
        torch.randn(P, N, 8, generator=g),
        {"final": torch.rand(P, N, generator=g)},
        {"final": torch.randn(P, N, 4, generator=g)},
        torch.randn(P, 8, generator=g),
    )
    lay = layout((336, 672), Geometry(N, 336, ((336, 672),), newline=True))
    sel = SelectionConfig(selector="visionzip", mode="reference", budget_tokens=3 * 13)
    t = VisionZip().select(sel, lay, seen)
    d, c = split(13)
    idx = t.indices.tolist()
    assert len(idx) == VisionZip().count(sel, lay) == 39
    assert idx[0] == NEW and idx[d : d + c] == [NEW] * c  # full image: CLS first, contextual after
    assert idx[1:d] == sorted(idx[1:d]) and max(idx[1:d]) < N
    subs = idx[d + c : d + c + 2 * (d - 1)]  # sub-images' dominant patches: canvas raster order
    row_col = [(((i - N) % N) // 4, (i - N) // N * 4 + (i - N) % 4) for i in subs]
    assert row_col == sorted(row_col)
    assert idx[d + c + 2 * (d - 1) :] == [NEW] * (2 + 2 * c)
    assert torch.equal(t.new[0], seen.cls_states[0]) and torch.equal(t.new[c + 1 : c + 3], seen.cls_states[1:])
    assert int(t.mask.sum()) == 3 * (d - 1)


# --------------------------------------------------------------------------- the HF engine


@pytest.fixture(scope="module")
def loaded(tiny_next):
    return load_llava(ModelConfig(path=str(tiny_next)))


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_engine_counts_and_vectors_every_grid(loaded, mode):
    """The token plan's count is what the engine sends; kept_indices name the dominant
    originals and one NEW per CLS and contextual token; the NEW rows sent are the
    projected CLS states and merged tokens."""
    model, proc = loaded
    sel = SelectionConfig(selector="visionzip", budget=0.2, mode=mode, save_indices=True)
    eng = HiredEngine(model, proc, sel, GenerationConfig(max_new_tokens=2))
    prepared = [eng.pre(im, "What is it?") for im in noise_images(GRID_SIZES, 3)]
    vis = eng.encode(prepared)
    items = eng.generate_prepared(prepared).items
    for size, p, item, feats in zip(GRID_SIZES, prepared, items, vis.features):
        P = p.pixel_values.shape[0]
        shares = partition_tokens(0.2, mode, P, 576)
        assert item["n_visual_tokens_kept"] == visual_tokens(size, sel, eng.geometry) == sum(shares) == len(feats)
        sent = item["kept_indices"]
        assert sent.count(NEW) == P + sum(split(t)[1] for t in shares)
        originals = [i for i in sent if i >= 0]
        assert len(set(originals)) == len(originals) == sum(split(t)[0] - 1 for t in shares)
        # an original row is the projected feature-layer state of that patch
        pix = torch.from_numpy(p.pixel_values)
        with torch.inference_mode():
            hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2]
            projected = model.model.multi_modal_projector(hidden)  # (P, 577, D)
        at = sent.index(originals[0])
        p0, j0 = divmod(originals[0], 576)
        assert torch.allclose(feats[at], projected[p0, j0 + 1], atol=1e-5)
        assert torch.allclose(feats[0], projected[0, 0], atol=1e-5)  # the full image's CLS first
    if mode == "exact":  # the budget to the token, as HiRED's exact mode
        assert [i["n_visual_tokens_kept"] for i in items] == [round(0.2 * (1 + r * c) * 576) for r, c in _grids(eng)]


def _grids(eng):
    return [eng.grid_of(s) for s in GRID_SIZES]


def test_budget_too_small_for_a_dominant_token_per_crop_fails_before_ray(capsys, tmp_path, tiny_next):
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(pa.table({"image": [img], "question": ["q"]}), tmp_path / "in.parquet")
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model", str(tiny_next)]
    code, err = run_before_ray(capsys, *args, "--selector", "visionzip", "--budget-tokens", "9")
    assert code == 2 and len(err.splitlines()) == 1
    assert "visionzip needs at least 2 tokens per crop" in err and "at least 10 tokens" in err  # 1 + 2x2 crops


# --------------------------------------------------------------------------- the published code


@pytest.fixture(scope="module")
def golden():
    return golden_file("visionzip_golden.json")


@pytest.fixture(scope="module")
def published_sized(tmp_path_factory, golden):
    return golden_checkpoint(tmp_path_factory, golden)


@pytest.mark.slow
def test_reference_mode_sends_what_the_published_code_sends(golden, published_sized):
    """Tokens sent (originals by index, CLS and merged vectors by their norms), their
    order and the greedy answers of the published VisionZip code, run unmodified on
    LLaVA's own code (tests/data/make_visionzip_golden.py): every anyres grid, budgets
    0.1 / 0.2 / 0.5."""
    model, proc = published_sized
    pixels_of = golden_script().golden_pixels
    n_new = golden["max_new_tokens"]
    for budget in sorted({c["budget"] for c in golden["cases"]}):
        cases = [c for c in golden["cases"] if c["budget"] == budget]
        sel = SelectionConfig(selector="visionzip", mode="reference", budget=budget, save_indices=True)
        eng = HiredEngine(model, proc, sel, GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new))
        prepared = [
            eng.pre(make_synthetic_image(c["width"], c["height"], c["seed"]), golden["question"]) for c in cases
        ]
        prepared = [
            replace(p, pixel_values=pixels_of(p.pixel_values.shape, c["seed"])) for p, c in zip(prepared, cases)
        ]
        vis = eng.encode(prepared)
        items = eng.generate_prepared(prepared).items
        for c, item, feats in zip(cases, items, vis.features):
            where = f"{c['height']}x{c['width']} at budget {budget}"
            assert split(partition_tokens(budget, "reference", 1, 576)[0]) == (c["dominant"], c["contextual"]), where
            assert item["n_visual_tokens_kept"] == c["n_sent"], where
            assert item["kept_indices"] == c["order"], where
            norms = feats.norm(dim=-1)
            assert torch.allclose(norms, torch.tensor(c["row_norms"]), rtol=1e-4, atol=1e-4), where
            want = proc.tokenizer.decode(c["greedy_ids"], skip_special_tokens=True).strip()
            assert item["answer"] == want, where
    grids = {eng.grid_of((c["height"], c["width"])) for c in golden["cases"]}
    assert grids == {(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)}


# --------------------------------------------------------------------------- visualize


def test_visualize_draws_dominant_and_merged_tokens_apart(loaded, tmp_path):
    from hired_batch.eval import visualize as vz

    model, proc = loaded
    sel = SelectionConfig(selector="visionzip", budget=0.2, save_indices=True)
    eng = HiredEngine(model, proc, sel, GenerationConfig(max_new_tokens=1))
    image = make_synthetic_image(900, 400, seed=1)  # grid 1x3: P = 4
    panels = vz.panels_for_image(eng, image)
    shares = partition_tokens(0.2, "exact", 4, 576)
    assert int(panels.keep.sum()) == sum(split(t)[0] - 1 for t in shares)  # the dominant patches
    assert panels.merged == sum(split(t)[1] for t in shares)  # the contextual tokens
    shade = vz.token_shading(panels.keep[0], panels.valid[0], merged=True)
    assert tuple(shade[~panels.keep[0].reshape(24, 24)][0]) == vz.MERGED_RGBA  # merged, not dimmed as dropped
    _, labels = vz._legend_entries(False, (0, 0, 0), panels.merged)
    assert labels[:2] == ["dominant", f"merged into {panels.merged} contextual"]
    saved = vz.panels_from_indices(eng, image, eng.encode([eng.pre(image, "q")]).indices[0], panels.kept, "x")
    assert np.array_equal(saved.keep, panels.keep) and saved.merged == panels.merged
    assert vz.draw(panels, tmp_path / "zip.png").stat().st_size > 0


def test_ideal_model_costs_visionzip_like_hired_at_equal_tokens():
    """The ideal model reads the token plan: at one budget in exact mode VisionZip sends
    as many tokens as HiRED, all through the projector (its merge costs ~5e-5 of a crop's
    CLIP pass, left out), so the same predicted cost."""
    from hired_batch.bench import ideal
    from hired_batch.bench.model_sizes import get_preset

    d = get_preset("llava-next-7b").dims()
    for hw in [(336, 672), (672, 672), (1008, 336)]:
        zipped = ideal.item_tokens(d, hw, SelectionConfig(selector="visionzip", budget=0.2), n_text=20)
        hired = ideal.item_tokens(d, hw, SelectionConfig(selector="hired", budget=0.2), n_text=20)
        assert zipped == hired and zipped.n_projected is None
