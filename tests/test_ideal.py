"""The FLOP/byte model against numbers computed by hand, and the presets' shapes."""

import pytest

from hired_batch.bench import ideal
from hired_batch.bench.ideal import Roofline
from hired_batch.config import SelectionConfig
from hired_batch.engine import dims, token_plan
from hired_batch.engine.dims import ItemTokens, ModelDims

# A toy model small enough to count by hand: CLIP width 2 (MLP 4), one layer run,
# 28 px crops with 14 px patches (N = 4 patches, T = 5 with CLS); Llama width 4
# (MLP 8), one layer, 2 query heads and 1 KV head (kv_dim 2), vocab 10, 2 bytes/param.
TOY = ModelDims(
    v_hidden=2,
    v_intermediate=4,
    v_heads=1,
    v_layers_run=1,
    t_hidden=4,
    t_intermediate=8,
    t_layers=1,
    t_heads=2,
    t_kv_heads=1,
    vocab=10,
    image_size=28,
    patch_size=14,
    bytes_per_param=2,
)


def test_toy_parameter_counts():
    assert (TOY.n_patches, TOY.v_tokens, TOY.kv_dim) == (4, 5, 2)
    # layer: q,k,v,o 4*2*2 = 16, MLP 2*2*4 = 16; patch embedding 3*14*14*2 = 1176
    assert dims.vision_params(TOY) == 16 + 16 + 1176
    assert dims.projector_params(TOY) == 2 * 4 + 4 * 4  # 24
    # q,o 2*4*4 = 32; k,v 2*4*2 = 16; SwiGLU 3*4*8 = 96
    assert dims.lm_layer_params(TOY) == 144
    assert dims.lm_params(TOY) == 144 + 4 * 10  # + LM head
    # everything incl. the embedding table (40), 2 bytes each
    assert dims.weight_bytes(TOY) == (1208 + 24 + 184 + 40) * 2
    assert dims.kv_bytes_per_token(TOY) == 2 * 1 * 2 * 2  # K and V, 1 layer, kv_dim 2, 2 bytes


def test_toy_flops():
    # patch embedding 2*4*588*2 = 9408; layer 2*5*32 + 4*5*5*2 = 520
    assert ideal.vision_flops_per_crop(TOY) == 9408 + 520
    assert ideal.projector_flops(TOY, 2) == 2 * 2 * 24
    assert ideal.lm_dense_flops_per_token(TOY) == 288
    # 3 tokens: 3*288 dense + causal 2*4*3*4 = 96 + head on the last 2*4*10 = 80
    assert ideal.prefill_flops(TOY, 3) == 864 + 96 + 80
    # after 3 cached: dense 288 + attention 4*4*(3+1) = 64 + head 80
    assert ideal.decode_step_flops(TOY, 3) == 432
    assert ideal.flop_ratio(TOY) == pytest.approx(288 / 64)


def test_toy_roofline_batch_time():
    roof = Roofline(flops_per_s=1000.0, bytes_per_s=100.0)
    t = ideal.batch_time(TOY, [ItemTokens(n_crops=1, n_visual=2, n_text=1)], max_new_tokens=2, roof=roof)
    # vision: 10024 FLOPs (10.0 s) vs 2464 weight bytes (24.64 s): memory-bound
    assert t.vision_s == pytest.approx(24.64)
    # prefill: 1040 FLOPs (1.04 s) vs 368 weight + 3*8 KV bytes (3.92 s)
    assert t.prefill_s == pytest.approx(3.92)
    # one decode step: 432 FLOPs vs 368 + 4*8 bytes (4.0 s)
    assert t.decode_s == pytest.approx(4.0)
    assert t.total_s == pytest.approx(32.56)
    # compute-bound machine: FLOPs decide
    fast_mem = Roofline(1000.0, 1e12)
    t2 = ideal.batch_time(TOY, [ItemTokens(1, 2, 1)], 2, fast_mem)
    assert (t2.vision_s, t2.prefill_s, t2.decode_s) == pytest.approx((10.024, 1.04, 0.432))


def test_decode_weights_are_shared_by_the_batch():
    roof = Roofline(1e15, 1e9)  # memory-bound decode
    one = ideal.batch_time(TOY, [ItemTokens(1, 2, 1)], 9, roof).decode_s
    four = ideal.batch_time(TOY, [ItemTokens(1, 2, 1)] * 4, 9, roof).decode_s
    assert one < four < 4 * one


def test_7b_shapes_from_transformers_config_and_the_22_to_1_ratio():
    from transformers import LlavaNextConfig

    from hired_batch.bench.model_sizes import PRESETS

    dims = ModelDims.from_hf(LlavaNextConfig(), bytes_per_param=2)  # defaults: CLIP-L + Llama-7B
    assert (dims.v_layers_run, dims.v_hidden, dims.t_layers, dims.t_hidden) == (23, 1024, 32, 4096)
    preset = PRESETS["llava-next-7b"].dims()
    assert preset == ModelDims(**{**dims.__dict__, "vocab": preset.vocab})
    assert 21.5 < ideal.flop_ratio(dims) < 23.0
    assert 20.0 < ideal.flop_ratio(PRESETS["scaled"].dims()) < 24.0
    assert 20.0 < ideal.flop_ratio(PRESETS["scaled"].dims(), 2950) < 24.0


def test_item_tokens_counts():
    d = dims.ModelDims(
        v_hidden=8,
        v_intermediate=8,
        v_heads=1,
        v_layers_run=1,
        t_hidden=8,
        t_intermediate=8,
        t_layers=1,
        t_heads=1,
        t_kv_heads=1,
        vocab=8,
    )
    full = ideal.item_tokens(d, (672, 672), SelectionConfig(selector="full", budget=1.0), n_text=10)
    assert (full.n_crops, full.n_visual, full.n_projected, full.n_prompt) == (5, 576 + 48 * 48 + 48, 5 * 576, 2938)
    assert ideal.item_tokens(d, (672, 672), SelectionConfig(selector="hired", budget=0.2), 10).n_visual == 576
    assert (
        ideal.item_tokens(d, (336, 672), SelectionConfig(selector="full", budget=1.0), 10).n_visual
        == 576 + 24 * 48 + 24
    )
    assert ideal.item_tokens(d, (336, 672), SelectionConfig(selector="spatial", budget=0.2), 10).n_visual == round(
        0.2 * 3 * 576
    )


def test_ideal_speedup_grows_as_the_budget_falls_and_stays_below_the_token_ratio():
    d = dims.ModelDims(
        v_hidden=1024,
        v_intermediate=4096,
        v_heads=16,
        v_layers_run=23,
        t_hidden=4096,
        t_intermediate=11008,
        t_layers=32,
        t_heads=32,
        t_kv_heads=32,
        vocab=32064,
        bytes_per_param=2,
    )
    roof = Roofline(300e12, 2e12)
    sizes = [(672, 672), (480, 640), (1008, 336), (336, 672)]

    def batches(sel, b):
        return [[ideal.item_tokens(d, hw, SelectionConfig(selector=sel, budget=b), 16) for hw in sizes]]

    def items_per_s(bs):
        return sum(map(len, bs)) / ideal.workload_time(d, bs, 8, roof)

    full = batches("full", 1.0)
    ups = [items_per_s(batches("hired", b)) / items_per_s(full) for b in (0.4, 0.2, 0.1)]
    assert 1.0 < ups[0] < ups[1] < ups[2]
    tokens = sum(i.n_prompt for i in full[0]) / sum(i.n_prompt for i in batches("hired", 0.2)[0])
    assert ups[1] < tokens  # vision and decode do not shrink with the budget


@pytest.mark.parametrize("kind", ["llava_next", "llava"])
def test_item_tokens_is_the_engines_token_plan(kind, tiny_next, tiny_llava):
    """The ideal model counts tokens with the plan the engines run (token_plan), on the
    geometry its ModelDims give: no second copy of the anyres or budget arithmetic."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_next if kind == "llava_next" else tiny_llava)
    d = ModelDims.from_hf(cfg)
    geo = token_plan.Geometry.from_config(cfg)
    assert token_plan.Geometry.from_dims(d) == geo
    sels = [
        SelectionConfig(selector="full"),
        SelectionConfig(selector="hired", budget=0.1),
        SelectionConfig(selector="spatial", budget=0.37),
        SelectionConfig(selector="hired", budget_tokens=700),
        SelectionConfig(selector="hired", budget=0.2, mode="reference"),
    ]
    for hw in [(672, 672), (480, 640), (1008, 336), (336, 672), (300, 270), (50, 900)]:
        for sel in sels:
            assert ideal.item_tokens(d, hw, sel, 12) == token_plan.item_tokens(hw, sel, geo, 13), (hw, sel)


def test_ask_shares_vision_and_prefix_and_saves_more_with_more_questions():
    """k questions of one image: the tower and the prefix once (ask_times); the saving is
    about nil at k = 1, grows with k and stays below the share of vision + prefix."""
    from hired_batch.bench.model_sizes import PRESETS

    d = PRESETS["llava-next-7b"].dims(2)
    roof = Roofline(400e12, 2e12)
    items = [ideal.item_tokens(d, (672, 1008), SelectionConfig(budget=0.2), n_text=20) for _ in range(8)]
    savings = [ideal.ask_saving(d, items, 12, k, 16, roof) for k in (1, 2, 4, 8)]
    assert abs(savings[0]) < 0.05
    assert savings == sorted(savings) and savings[-1] > 0.3
    separate, _ = ideal.ask_times(d, items, 12, 8, 16, roof)
    decode = ideal.batch_time(d, items * 8, 16, roof).decode_s
    assert savings[-1] < 1 - decode / separate  # the 8 x 8 answers' decoding is never shared
    # a question continuing a cached prefix costs its own tokens and its attention to the prefix
    assert ideal.suffix_prefill_flops(d, 0, 30) == ideal.prefill_flops(d, 30)
    assert ideal.suffix_prefill_flops(d, 500, 30) > ideal.suffix_prefill_flops(d, 0, 30)
