"""The plugin's multimodal processor (no engine): placeholder counts and option checks.

Counts are compared with what our HF engine's vision pass sends (``encode().counts``,
i.e. its ``n_visual_tokens_kept``) for every anyres grid of the tiny checkpoint and
a range of budgets. Bad options must fail in ``LLM(...)`` before an engine starts.
"""

import time

import pytest
from conftest import ENGINE_ARGS, LLAVA, NEXT, SIZES, hf_engine, hired_overrides, picture, start_llm

BUDGETS = [
    dict(budget=0.05),
    dict(budget=0.2),
    dict(budget=0.5),
    dict(budget=1.0),
    dict(budget_tokens=100),
    dict(budget=0.3, alpha=0.9),
]


def _processor(path, **overrides):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what LLM(...) does in every process
    return MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(path), dtype="float32", hf_overrides=overrides))


def _placeholders(proc, image, **request) -> int:
    cfg = proc.info.get_hf_config()
    out = proc(
        [1, cfg.image_token_index, 2], proc.info.parse_mm_data({"image": [image]}), hf_processor_mm_kwargs=request
    )
    (ph,) = out["mm_placeholders"]["image"]
    assert sum(t == cfg.image_token_index for t in out["prompt_token_ids"]) == ph.length
    return ph.length


def _hf_kept(engine, image) -> int:
    return engine.encode([engine.pre(image, "q")]).counts[0]


@pytest.mark.parametrize("selector", ["hired", "spatial", "random"])
def test_placeholders_equal_hf_kept_counts_for_every_grid_and_budget(vllm_next, selector):
    proc = _processor(vllm_next, **hired_overrides(NEXT, selector=selector))
    for opts in BUDGETS:
        hf = hf_engine(vllm_next, selector=selector, **opts)
        request = {f"hired_{k}": v for k, v in opts.items()}
        for w, h in SIZES:
            img = picture(w, h)
            assert _placeholders(proc, img, **request) == _hf_kept(hf, img), (selector, opts, (w, h))


def test_full_selector_places_stock_counts(vllm_next):
    full, stock = _processor(vllm_next, **hired_overrides(NEXT, selector="full")), _processor(vllm_next)
    hf = hf_engine(vllm_next, selector="full")
    for w, h in SIZES:
        img = picture(w, h)
        assert _placeholders(full, img) == _placeholders(stock, img) == _hf_kept(hf, img)


def test_llava15_placeholders(vllm_llava):
    proc = _processor(vllm_llava, **hired_overrides(LLAVA, budget=0.2))
    img = picture(500, 333)
    assert _placeholders(proc, img) == _hf_kept(hf_engine(vllm_llava, budget=0.2), img) == round(0.2 * 576)
    assert _placeholders(proc, img, hired_budget_tokens=7) == 7


def test_bad_request_options_are_rejected(vllm_next):
    proc = _processor(vllm_next, **hired_overrides(NEXT))
    img = picture(300, 200)
    for request, words in (
        ({"hired_budget": 1.5}, "budget must be a fraction"),
        ({"hired_budget_tokens": 0}, "budget_tokens must be >= 1"),
        ({"hired_alpha": -0.1}, "alpha must be in"),
        ({"hired_selector": "spatial"}, "per request only"),
        ({"hired_budget": "half"}, "must be a number"),
    ):
        with pytest.raises(ValueError, match=words):
            _placeholders(proc, img, **request)


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(budget=2.0), "budget must be a fraction in"),
        (dict(selector="best"), "selector must be one of"),
        (dict(mode="reference"), "hired_mode must be 'exact'"),
        (dict(alpha=1.5), "alpha must be in"),
        (dict(budgett=0.3), "unknown hf_overrides"),
    ],
)
def test_bad_engine_options_fail_before_the_engine_starts(vllm_next, options, words):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        start_llm(vllm_next, **hired_overrides(NEXT, **options))
    # The front end raises while building its processor; an engine start (model
    # load, KV cache, warm-up) takes over a minute here, so this bound tells them apart.
    assert time.perf_counter() - t0 < 60


def test_engine_wide_options_in_mm_processor_kwargs_are_refused(vllm_next):
    from vllm import LLM

    with pytest.raises(ValueError, match="go in hf_overrides"):
        LLM(
            model=str(vllm_next),
            hf_overrides=hired_overrides(NEXT),
            mm_processor_kwargs={"hired_budget": 0.3},
            **ENGINE_ARGS,
        )
