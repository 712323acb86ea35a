"""The vLLM plugin's options (``hired_batch.engine.vllm.options``): pure, no vLLM needed."""

from types import SimpleNamespace

import pytest

from hired_batch.config import SelectionConfig
from hired_batch.engine.vllm.options import engine_selection, request_selection


def test_engine_options_come_from_hired_attributes_with_defaults():
    assert engine_selection(SimpleNamespace(model_type="llava_next")) == SelectionConfig()
    sel = engine_selection(SimpleNamespace(hired_selector="spatial", hired_budget=0.4, hired_alpha=0.7, hired_seed=3))
    assert sel == SelectionConfig(selector="spatial", budget=0.4, alpha=0.7, seed=3)


@pytest.mark.parametrize(
    "attrs, words",
    [
        (dict(hired_budget=0.0), "budget must be a fraction"),
        (dict(hired_selector="best"), "selector must be one of"),
        (dict(hired_mode="reference"), "must be 'exact'"),
        (dict(hired_budget_tokens=0), "budget_tokens must be >= 1"),
        (dict(hired_budget="0.2"), "hired_budget must be a number"),
        (dict(hired_budgte=0.2), "unknown hf_overrides"),
    ],
)
def test_bad_engine_options_are_refused(attrs, words):
    with pytest.raises(ValueError, match=words):
        engine_selection(SimpleNamespace(**attrs))


def test_request_options_override_the_engine_ones():
    base = SelectionConfig(budget=0.2, budget_tokens=50, alpha=0.5)
    assert request_selection(base, {}) is base
    assert request_selection(base, {"hired_budget": 0.6}) == SelectionConfig(budget=0.6, alpha=0.5)
    assert request_selection(base, {"hired_budget_tokens": 9, "hired_alpha": 1.0}).budget_arg == 9
    assert request_selection(base, {"do_resize": True}) is base  # other processor kwargs pass by


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"hired_budget": 1.2}, "budget must be a fraction"),
        ({"hired_alpha": 2}, "alpha must be in"),
        ({"hired_selector": "full"}, "per request only"),
        ({"hired_budget": True}, "must be a number"),
    ],
)
def test_bad_request_options_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        request_selection(SelectionConfig(), kwargs)


def test_request_budgets_are_refused_when_the_engine_keeps_every_token():
    with pytest.raises(ValueError, match="selector is 'full'"):
        request_selection(SelectionConfig(selector="full"), {"hired_budget": 0.5})


def test_cpu_head_size_check_refuses_what_vllms_cpu_attention_cannot_run(tiny_next, tmp_path):
    from hired_batch.config import ConfigError
    from hired_batch.engine.tiny import VLLM_WIDTHS, build_tiny_checkpoint
    from hired_batch.engine.vllm.options import check_cpu_head_size, text_head_size

    assert text_head_size(SimpleNamespace(text_config=SimpleNamespace(hidden_size=4096, num_attention_heads=32))) == 128
    assert text_head_size(SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=80)) == 80
    with pytest.raises(ConfigError, match="head size is 16, which vLLM's CPU attention cannot run .*tiny-model --vllm"):
        check_cpu_head_size(str(tiny_next))  # the default tiny checkpoint: 64 / 4 heads
    check_cpu_head_size(str(build_tiny_checkpoint(tmp_path / "v", "llava_next", widths=VLLM_WIDTHS)))  # 32: runs
    check_cpu_head_size(str(tmp_path / "missing"))  # unreadable: the model check reports it
