"""The selector seam (``engine/selectors``): the registry, the one select/embed path, and
two methods written here, in a test module, that run through the token plan and the HF
engine on the tiny checkpoint without any other file knowing them: one keeps a subset
(``FirstK``), one sends vectors it makes (``MeanPerCrop``, VisionZip's kind of output)."""

import pytest
import torch
from support.images import noise_images

from hired_batch.config import SELECTORS, ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine import selectors, token_plan
from hired_batch.engine.anyres import NEWLINE, Layout, packed_order
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.selectors import NEW, MaskSelector, Needs, Selector, Tokens
from hired_batch.engine.weights import load_llava

SIZES = [(336, 336), (300, 800), (1000, 1000), (500, 300)]  # (h, w): 2x1.. grids, padding rows


class FirstK(MaskSelector):
    """Toy subset method: the first k content tokens of every crop, k = budget_tokens."""

    name = "first_k"

    def count(self, selection, layout):
        return int(layout.valid_mask().sum(dim=1).clamp(max=selection.budget_tokens).sum())

    def mask(self, selection, layout, seen):
        valid = layout.valid_mask()
        return valid & (valid.cumsum(dim=1) <= selection.budget_tokens)  # cumsum: rank among content tokens


class MeanPerCrop(Selector):
    """Toy method that sends new vectors: one per crop, the mean of its feature-layer states."""

    name = "mean_per_crop"

    def count(self, selection, layout):
        return layout.n_parts

    def select(self, selection, layout, seen):
        P, N = layout.n_parts, layout.n_tokens
        return Tokens(torch.full((P,), NEW), torch.zeros(P, N, dtype=torch.bool), new=seen.features.mean(dim=1))


@pytest.fixture(scope="module")
def toys():
    for cls in (FirstK, MeanPerCrop):
        selectors.register(cls)
    yield
    for cls in (FirstK, MeanPerCrop):
        selectors.unregister(cls.name)


@pytest.fixture(scope="module")
def loaded(tiny_next):
    return load_llava(ModelConfig(path=str(tiny_next)))


# --------------------------------------------------------------------------- registry


def test_the_cli_offers_exactly_the_selector_modules():
    """config.SELECTORS (the CLI's list, which imports no torch) names every method module."""
    package = "hired_batch.engine.selectors."
    builtin = {n for n in selectors.names() if type(selectors.get(n)).__module__.startswith(package)}
    assert builtin == set(SELECTORS)


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match=r"selector must be one of \(.*'hired'.*\), got 'oracle'"):
        selectors.get("oracle")

    class Other(MaskSelector):
        name = "hired"

    with pytest.raises(ValueError, match="already"):
        selectors.register(Other)
    assert type(selectors.get("hired")).__name__ == "Hired"


def test_needs_name_the_layers():
    assert selectors.get("hired").needs.layer_ids(0, 22) == {"init": 0, "final": 22}
    assert selectors.get("spatial").needs.layer_ids(0, 22) == {}
    zips = selectors.get("visionzip").needs  # keys and the CLS state of the feature layer's input layer
    assert (zips.layer_ids(0, 22), zips.key_layer_ids(0, 22), zips.cls_state) == ({"final": 22}, {"final": 22}, True)
    assert Needs(cls_rows=("init",)).key_layer_ids(0, 22) == {}


# --------------------------------------------------------------------------- the one path


def test_select_checks_the_count_a_selector_planned():
    class Liar(FirstK):
        name = "liar"

        def count(self, selection, layout):
            return super().count(selection, layout) + 1

    selectors.register(Liar)
    try:
        sel = SelectionConfig(selector="liar", budget_tokens=3)
        with pytest.raises(RuntimeError, match="sent 6 tokens for an image planned at 7"):
            selectors.select([sel], [Layout((336, 336), (1, 1), 16)])
    finally:
        selectors.unregister("liar")


def test_embed_gathers_projects_and_fills_newline_and_made_slots():
    torch.manual_seed(0)
    proj = torch.nn.Linear(4, 3)
    feats = torch.randn(3, 5, 4)  # two images: P = 1 and P = 2, N = 5
    made = torch.randn(1, 4)
    a = Tokens(torch.tensor([4, 0]), torch.zeros(1, 5, dtype=torch.bool))
    b = Tokens(torch.tensor([7, NEWLINE, NEW, 2]), torch.zeros(2, 5, dtype=torch.bool), new=made)
    newline = torch.randn(3)
    out = selectors.embed([a, b], feats, [1, 2], proj, newline)
    flat = feats.reshape(-1, 4)
    want_b = torch.stack([proj(flat[5 + 7]), newline, proj(made[0]), proj(flat[5 + 2])])
    assert [o.shape for o in out] == [(2, 3), (4, 3)]
    torch.testing.assert_close(out[0], proj(flat[[4, 0]]))
    torch.testing.assert_close(out[1], want_b)
    stock = selectors.embed([a], feats[:1], [1], proj, stock=True)  # project everything, then pick
    torch.testing.assert_close(stock[0], out[0])
    with pytest.raises(RuntimeError, match="image_newline"):
        selectors.embed([b], feats[1:], [2], proj)


# --------------------------------------------------------------------------- a method from a test module


def test_a_registered_subset_method_runs_through_the_plan_and_the_engine(toys, loaded):
    model, proc = loaded
    sel = SelectionConfig(selector="first_k", budget_tokens=7, save_indices=True)
    eng = HiredEngine(model, proc, sel, GenerationConfig(max_new_tokens=3))
    prepared = [eng.pre(im, "What is it?") for im in noise_images(SIZES, 0)]
    res = eng.generate_prepared(prepared)
    N = eng.n_tokens
    for p, item in zip(prepared, res.items):
        size = tuple(int(v) for v in p.image_size)
        grid, valid = eng.grid_of(size), eng.valid_of(size, eng.grid_of(size))
        first = {q * N + j for q in range(valid.shape[0]) for j in valid[q].nonzero().flatten()[:7].tolist()}
        assert item["kept_indices"] == [i for i in packed_order(size, grid, N).tolist() if i in first]
        plan = token_plan.item_tokens(size, sel, eng.geometry, len(p.input_ids))
        assert item["n_visual_tokens_kept"] == plan.n_visual == len(first) == eng.planned_count(size)
        assert item["n_prompt_tokens"] == plan.n_prompt and item["n_generated_tokens"] >= 1


def test_a_registered_method_that_makes_vectors_runs_through_the_engine(toys, loaded):
    model, proc = loaded
    sel = SelectionConfig(selector="mean_per_crop", save_indices=True)
    eng = HiredEngine(model, proc, sel, GenerationConfig(max_new_tokens=3))
    prepared = [eng.pre(im, "What is it?") for im in noise_images(SIZES[:2], 1)]
    vis = eng.encode(prepared)
    for p, feats, idx in zip(prepared, vis.features, vis.indices):
        pix = torch.from_numpy(p.pixel_values)
        with torch.inference_mode():
            hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states
            want = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:].mean(dim=1))
        assert idx == [NEW] * pix.shape[0]
        torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)
    items = eng.generate_prepared(prepared).items
    assert [i["n_visual_tokens_kept"] for i in items] == [p.pixel_values.shape[0] for p in prepared]
    assert [i["n_visual_tokens_kept"] for i in items] == [eng.planned_count(tuple(p.image_size)) for p in prepared]
