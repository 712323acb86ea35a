"""The engine on the tiny checkpoint: geometry, counts, hooks, parity with stock."""

import pytest
import torch
from support.golden import golden_checkpoint, golden_file, golden_script
from support.images import noise_images

from hired_batch.config import ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.weights import Preprocessor, load_llava

SIZES = [(336, 336), (300, 800), (1000, 1000), (500, 300), (200, 1100)]  # (h, w)
QUESTIONS = [
    "What is this?",
    "How many cats are there in the picture?",
    "Describe it.",
    "Color?",
    "Is there a dog on the left side of the road?",
]


def images(sizes=SIZES, seed=0):
    return noise_images(sizes, seed)


@pytest.fixture(scope="module")
def loaded(tiny_next):
    return load_llava(ModelConfig(path=str(tiny_next)))


@pytest.fixture(scope="module")
def loaded15(tiny_llava):
    return load_llava(ModelConfig(path=str(tiny_llava)))


def engine(loaded, max_new_tokens=6, **sel):
    model, proc = loaded
    return HiredEngine(model, proc, SelectionConfig(**sel), GenerationConfig(max_new_tokens=max_new_tokens))


def stock_answers(model, proc, eng, imgs, qs, max_new_tokens=6):
    proc.tokenizer.padding_side = "left"
    inp = proc(text=[eng.pre.prompt(q) for q in qs], images=imgs, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inp["input_ids"].shape[1] :], inp


# --------------------------------------------------------------------------- geometry vs stock


def test_full_count_and_packed_order_match_stock_llava_next(loaded):
    model, proc = loaded
    eng = engine(loaded, selector="full", budget=1.0)
    N, D = eng.n_tokens, 3
    for size in SIZES + [(1, 1000), (2000, 50)]:
        grid = eng.grid_of(size)
        P = grid[0] * grid[1] + 1
        # stock count: the processor's placeholder expansion
        want = proc._get_number_of_features(size[0], size[1], 336, 336) - 1
        assert eng.full_count(size) == want
        # stock order: pack_image_features on features that encode their own index
        feats = torch.arange(P * N, dtype=torch.float64)[:, None].repeat(1, D).view(P, N, D)
        newline = torch.full((D,), -1.0, dtype=torch.float64)
        stock, _ = model.model.pack_image_features([feats], torch.tensor([size]), "default", newline)
        ours = eng.packed_indices(None, size, grid, newline=True, full=True)
        assert stock[0][:, 0].long().tolist() == ours.tolist()


def test_cls_hook_rows_equal_eager_attention(loaded):
    """ClsAttentionHooks on the stock tower (SDPA) give eager attention's CLS rows, at the
    layers the engine reads."""
    from hired_batch.engine.vision import ClsAttentionHooks, vision_parts

    model, proc = loaded
    eng = engine(loaded)
    pix = torch.from_numpy(eng.pre(images([(500, 300)])[0], "q").pixel_values)
    tower = model.model.vision_tower
    hooks = ClsAttentionHooks(
        vision_parts(tower)[2], {eng.l_init, eng.l_final}, model.config.vision_config.num_attention_heads
    )
    try:
        with torch.inference_mode():
            tower(pix)  # SDPA, as the engine runs it
    finally:
        hooks.remove()
    tower.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = tower(pix, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    for layer in (eng.l_init, eng.l_final):
        want = out.attentions[layer][:, :, 0, 1:].sum(dim=1)
        torch.testing.assert_close(hooks.rows[layer], want, rtol=1e-5, atol=1e-6)
    assert eng.l_final == len(eng.layers) - 2


def test_encode_sends_the_stock_feature_layer_projected(loaded):
    """The engine's tower stops at the feature layer (vision_feature_layer=-2) and what
    encode sends is the stock tower's features there, projected, at the indices it reports."""
    model, proc = loaded
    eng = engine(loaded, selector="full", save_indices=True)
    prepared = eng.pre(images([(500, 300)])[0], "q")
    pix = torch.from_numpy(prepared.pixel_values)
    out = eng.encode([prepared])
    with torch.inference_mode():
        stock = model.model.vision_tower(pix, output_hidden_states=True)
        feats = stock.hidden_states[model.config.vision_feature_layer][:, 1:]  # (P, N, Dv), CLS dropped
        want = model.model.multi_modal_projector(feats).flatten(0, 1)  # (P*N, D)
    idx = torch.tensor(out.indices[0])
    assert out.counts[0] == len(idx) == out.features[0].shape[0] and (idx >= 0).sum() > 0
    torch.testing.assert_close(out.features[0][idx >= 0], want[idx[idx >= 0]], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- counts


def test_mixed_sizes_batch_kept_counts_match_placeholders(loaded):
    eng = engine(loaded, budget=0.2)
    imgs = images()
    prepared = [eng.pre(im, q) for im, q in zip(imgs, QUESTIONS)]
    res = eng.generate_prepared(prepared)
    for p, item in zip(prepared, res.items):
        P = p.pixel_values.shape[0]
        grid = eng.grid_of(tuple(p.image_size))
        valid = int(eng.valid_of(tuple(p.image_size), grid).sum())
        assert item["n_visual_tokens_kept"] == min(round(0.2 * P * 576), valid)
        assert item["n_visual_tokens_kept"] == eng.planned_count(tuple(p.image_size))
        # the prompt holds the text tokens plus exactly the kept visual tokens
        assert item["n_prompt_tokens"] == len(p.input_ids) - 1 + item["n_visual_tokens_kept"]
        assert item["n_visual_tokens_full"] == eng.full_count(tuple(p.image_size))
        assert 1 <= item["n_generated_tokens"] <= 6
    assert res.t_vision_s > 0 and res.t_prefill_s > 0 and res.t_decode_s >= 0


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["hired", "full"])
def test_vision_tower_in_chunks_of_crops_changes_nothing(loaded, selector):
    model, proc = loaded
    sel = SelectionConfig(selector=selector, budget=0.2 if selector == "hired" else 1.0)
    whole = HiredEngine(model, proc, sel, vision_chunk=10**6)
    prepared = [whole.pre(im, q) for im, q in zip(images(), QUESTIONS)]
    crops = sum(p.pixel_values.shape[0] for p in prepared)  # 19
    ref = whole.encode(prepared)
    for chunk in (1, 3, 8):
        eng = HiredEngine(model, proc, sel, vision_chunk=chunk)
        seen = []  # crops per tower call
        handle = eng.embeddings.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))  # noqa: B023 - removed below
        try:
            out = eng.encode(prepared)
        finally:
            handle.remove()
        assert seen == [chunk] * (crops // chunk) + ([crops % chunk] if crops % chunk else [])
        assert out.counts == ref.counts
        assert all(torch.equal(a, b) for a, b in zip(out.masks, ref.masks))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.features, ref.features))
    with pytest.raises(ValueError, match="vision_chunk"):
        HiredEngine(model, proc, sel, vision_chunk=0)


def test_budget_tokens_and_indices(loaded):
    eng = engine(loaded, budget_tokens=100, save_indices=True)
    res = eng.generate(images(SIZES[:3]), QUESTIONS[:3])
    for item in res.items:
        assert item["n_visual_tokens_kept"] == 100
        assert len(item["kept_indices"]) == 100
        assert len(set(item["kept_indices"])) == 100


# One image per anyres grid: 1x2, 2x1, 2x2, 1x3, 3x1, a 2x2 size that the published
# float32 unpadding cuts one row deeper, and a 1x2 whose transposed canvas holds more.
GRID_SIZES = [(336, 672), (672, 336), (500, 900), (336, 1008), (1008, 336), (684, 1216), (300, 270)]


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_kept_indices_are_exactly_the_tokens_sent_for_every_grid(loaded, mode):
    from hired_batch.engine.anyres import packed_order

    eng = engine(loaded, max_new_tokens=1, mode=mode, budget=0.2, save_indices=True)
    prepared = [eng.pre(im, "q") for im in images(GRID_SIZES)]
    assert sorted({eng.grid_of(s) for s in GRID_SIZES}) == [(1, 2), (1, 3), (2, 1), (2, 2), (3, 1)]
    vis = eng.encode(prepared)
    items = eng.generate_prepared(prepared).items
    for size, mask, item in zip(GRID_SIZES, vis.masks, items):
        sent = item["kept_indices"]
        assert len(sent) == item["n_visual_tokens_kept"] <= eng.planned_count(size)
        # the selected tokens, in the order the mode's geometry packs them, nothing else
        order = packed_order(size, eng.grid_of(size), 576, mode)
        assert sent == [i for i in order.tolist() if mask.flatten()[i]]
    if mode == "exact":  # budget met to the token
        assert [i["n_visual_tokens_kept"] for i in items] == [eng.planned_count(s) for s in GRID_SIZES]
    else:  # the published packing drops most selected tokens of a 1x3 image
        one_by_three = items[GRID_SIZES.index((336, 1008))]
        assert one_by_three["n_visual_tokens_kept"] < int(vis.masks[3].sum())


def test_reference_mode_runs_and_never_exceeds_the_budget(loaded):
    eng = engine(loaded, mode="reference", budget=0.2)
    res = eng.generate(images(), QUESTIONS)
    for size, item in zip(SIZES, res.items):
        P = eng.grid_of(size)[0] * eng.grid_of(size)[1] + 1
        assert 0 < item["n_visual_tokens_kept"] <= int(P * 576 * 0.2)


# --------------------------------------------------------------------------- the published code


@pytest.fixture(scope="module")
def golden():
    return golden_file("reference_golden.json")


@pytest.fixture(scope="module")
def published_sized(tmp_path_factory, golden):
    return golden_checkpoint(tmp_path_factory, golden)


@pytest.mark.slow
def test_reference_mode_sends_what_the_published_code_sends(golden, published_sized):
    """Tokens sent, their order and the greedy answers of the published HiRED code.

    tests/data/reference_golden.json was made by running the published implementation
    (its transformers 4.42 fork) on this checkpoint and these images; every anyres grid,
    sizes its float32 unpadding cuts deeper, budgets 0.1 / 0.2 / 0.5 / 1.0.
    """
    from dataclasses import replace

    from hired_batch.engine.inputs import make_synthetic_image

    model, proc = published_sized
    pixels_of = golden_script().golden_pixels  # seeded: no image processor's release in the way
    n_new = golden["max_new_tokens"]
    for budget in sorted({c["budget"] for c in golden["cases"]}):
        cases = [c for c in golden["cases"] if c["budget"] == budget]
        sel = SelectionConfig(mode="reference", budget=budget, alpha=golden["alpha"], save_indices=True)
        eng = HiredEngine(model, proc, sel, GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new))
        prepared = [
            eng.pre(make_synthetic_image(c["width"], c["height"], c["seed"]), golden["question"]) for c in cases
        ]
        prepared = [
            replace(p, pixel_values=pixels_of(p.pixel_values.shape, c["seed"])) for p, c in zip(prepared, cases)
        ]
        items = eng.generate_prepared(prepared).items
        for c, item in zip(cases, items):
            where = f"{c['height']}x{c['width']} at budget {budget}"
            assert item["n_visual_tokens_kept"] == c["n_sent"], where
            assert item["kept_indices"] == c["order"], where
            want = proc.tokenizer.decode(c["greedy_ids"], skip_special_tokens=True).strip()
            assert item["answer"] == want, where
    grids = {eng.grid_of((c["height"], c["width"])) for c in golden["cases"]}
    assert grids == {(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)}


def test_merge_refuses_mismatched_counts(loaded):
    eng = engine(loaded)
    ids = torch.tensor([[1, eng.cfg.image_token_id, eng.cfg.image_token_id, 5]])
    with pytest.raises(RuntimeError, match=r"placeholders \[2\] do not match kept features \[3\]"):
        eng.merge(ids, [torch.zeros(3, eng.cfg.text_config.hidden_size)])


# --------------------------------------------------------------------------- parity with stock


@pytest.mark.parametrize("selector, budget", [("hired", 0.2), ("full", 1.0)])
def test_item_by_item_prefill_equals_the_batched_one(loaded, monkeypatch, selector, budget):
    """CPU prefills a padded batch item by item; GPUs use stock batched prefill. Same tokens."""
    eng = engine(loaded, max_new_tokens=8, selector=selector, budget=budget)
    prepared = [eng.pre(im, q) for im, q in zip(images(), QUESTIONS)]  # mixed lengths: padded
    calls = []
    real = eng._prefill_each
    monkeypatch.setattr(eng, "_prefill_each", lambda *a: calls.append(1) or real(*a))
    each = eng.generate_prepared(prepared)
    assert calls, "a padded CPU batch must take the item-by-item prefill"
    monkeypatch.setattr(eng, "_prefill_alone", lambda attn: False)  # the GPU path
    batched = eng.generate_prepared(prepared)
    assert len(calls) == 1
    assert [i["answer"] for i in each.items] == [i["answer"] for i in batched.items]
    assert [i["n_generated_tokens"] for i in each.items] == [i["n_generated_tokens"] for i in batched.items]


def test_full_budget_matches_stock_generate_llava_next(loaded):
    model, proc = loaded
    eng = engine(loaded, selector="full", budget=1.0)
    imgs = images()
    stock, inp = stock_answers(model, proc, eng, imgs, QUESTIONS)
    res = eng.generate(imgs, QUESTIONS)
    tok = proc.tokenizer
    assert [tok.decode(s, skip_special_tokens=True).strip() for s in stock] == [i["answer"] for i in res.items]
    assert inp["attention_mask"].sum(dim=1).tolist() == [i["n_prompt_tokens"] for i in res.items]


def test_llava15_path_parity_and_pruning(loaded15):
    model, proc = loaded15
    eng = engine(loaded15, selector="full", budget=1.0)
    imgs, qs = images(SIZES[:3], seed=1), QUESTIONS[:3]
    stock, _ = stock_answers(model, proc, eng, imgs, qs)
    res = eng.generate(imgs, qs)
    assert [proc.tokenizer.decode(s, skip_special_tokens=True).strip() for s in stock] == [
        i["answer"] for i in res.items
    ]
    assert all(i["n_visual_tokens_full"] == 576 == i["n_visual_tokens_kept"] for i in res.items)
    for mode in ("exact", "reference"):
        pruned = engine(loaded15, budget=0.2, mode=mode).generate(imgs, qs)
        assert [i["n_visual_tokens_kept"] for i in pruned.items] == [115, 115, 115]


def test_selectors_all_generate(loaded):
    for sel in ("spatial", "random"):
        res = engine(loaded, selector=sel, budget=0.1).generate(images(SIZES[:2]), QUESTIONS[:2])
        assert [i["n_visual_tokens_kept"] for i in res.items] == [round(0.1 * 3 * 576), round(0.1 * 4 * 576)]


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, proc = loaded
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=123)
    eng = HiredEngine(model, proc, SelectionConfig(), gen)
    a = [i["answer"] for i in eng.generate(images(SIZES[:2]), QUESTIONS[:2]).items]
    b = [i["answer"] for i in eng.generate(images(SIZES[:2]), QUESTIONS[:2]).items]
    assert a == b


# --------------------------------------------------------------------------- loading rules


def test_preprocessor_alone_needs_no_weights(tiny_next):
    pre = Preprocessor.from_pretrained(str(tiny_next))
    p = pre(images([(300, 800)])[0], "What?")
    assert p.pixel_values.shape == (4, 3, 336, 336)
    assert p.image_size.tolist() == [300, 800]
    assert int((p.input_ids == pre.image_token_id).sum()) == 1


def test_refuses_pickle_weights_and_other_models(tiny_llava, tmp_path):
    import shutil

    from transformers import AutoConfig, LlavaForConditionalGeneration

    # a checkpoint whose weights exist only as a pickle (pytorch_model.bin)
    shutil.copytree(tiny_llava, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava).state_dict(), tmp_path / "bin" / "pytorch_model.bin"
    )
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_llava(ModelConfig(path=str(tmp_path / "bin")))
    cfg = AutoConfig.for_model("gpt2")
    cfg.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="expected one of"):
        load_llava(ModelConfig(path=str(tmp_path / "gpt2")))


def test_bad_selection_config_is_refused():
    for kwargs, match in [
        (dict(selector="x"), "selector"),
        (dict(budget=0.0), "budget"),
        (dict(alpha=2.0), "alpha"),
        (dict(mode="paper"), "mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            SelectionConfig(**kwargs).check()


def test_a_tower_that_keeps_cls_is_refused(loaded, monkeypatch):
    model, proc = loaded
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'default'"):
        HiredEngine(model, proc)


def test_selection_layers_is_the_one_check_every_backend_runs():
    """vision.selection_layers (the HF engine and the vLLM plugin both call it): LLaVA's
    feature layer -2 of 4 is hidden_states[3], so l_final = 2; CLS kept, a feature layer
    outside the tower, or a CLS layer the backend did not build are refused."""
    from types import SimpleNamespace

    from hired_batch.engine.dims import ModelDims
    from hired_batch.engine.vision import selection_layers

    def cfg(layer=-2, strategy="default"):
        return SimpleNamespace(
            vision_feature_select_strategy=strategy,
            vision_feature_layer=layer,
            vision_config=SimpleNamespace(num_hidden_layers=4),
        )

    assert selection_layers(cfg(), 4) == ([3], 0, 2)
    assert selection_layers(cfg([-1, 2]), 4) == ([4, 2], 0, 3)
    for c, n_built, match in [
        (cfg(strategy="full"), 4, "vision_feature_select_strategy must be 'default'"),
        (cfg(5), 4, "must name encoder layers 1..4"),
        (cfg(-1), 3, "3 CLIP layers built, got l_final 3"),
    ]:
        with pytest.raises(ConfigError, match=match):
            selection_layers(c, n_built)
    dims = {"vision_config": {"num_hidden_layers": 4}, "text_config": {}, "vision_feature_layer": [-1, 2]}
    assert ModelDims.from_hf(dims).v_layers_run == 4  # the same layer ids size the ideal model


@pytest.mark.parametrize("sel", [dict(selector="full"), dict(selector="hired", budget=0.3)])
def test_planned_item_is_what_runs(loaded, sel):
    """token_plan.item_tokens (engine.planned_item), which sizes batches and feeds the cost
    model, gives the crops, visual and prompt tokens the engine then actually runs."""
    eng = engine(loaded, max_new_tokens=2, **sel)
    prepared = [eng.pre(im, q) for im, q in zip(images(), QUESTIONS)]
    for p, item in zip(prepared, eng.generate_prepared(prepared).items):
        plan = eng.planned_item(tuple(int(v) for v in p.image_size), len(p.input_ids))
        assert plan.n_crops == p.pixel_values.shape[0]
        assert plan.n_visual == item["n_visual_tokens_kept"]
        assert plan.n_prompt == item["n_prompt_tokens"]
        assert plan.n_projected == (plan.n_crops * eng.n_tokens if sel["selector"] == "full" else None)
