"""HiRED options in vLLM: per engine from the HF config (``hf_overrides``), per request
from ``mm_processor_kwargs``; both become a checked ``SelectionConfig``.

Engine keys (``hf_overrides``): ``hired_selector``, ``hired_budget``,
``hired_budget_tokens``, ``hired_alpha``, ``hired_seed``, ``hired_mode`` (``exact``
only). Request keys (``mm_processor_kwargs``): ``hired_budget``,
``hired_budget_tokens``, ``hired_alpha``; they override the engine's for the images
of that request. Imports no vLLM, so it is testable and errors are plain ValueErrors.
"""

from __future__ import annotations

import dataclasses

from hired_batch.config import SelectionConfig

PREFIX = "hired_"
ENGINE_KEYS = ("selector", "budget", "budget_tokens", "alpha", "seed", "mode")
REQUEST_KEYS = ("budget", "budget_tokens", "alpha")


def engine_selection(hf_config) -> SelectionConfig:
    """The engine-wide selection from ``hired_*`` attributes of the HF config (defaults otherwise).

    Raises ValueError for a value out of range, an unknown selector, or reference mode
    (its per-image count depends on attention, so placeholders cannot be placed first).
    """
    given = {k: getattr(hf_config, PREFIX + k) for k in ENGINE_KEYS if getattr(hf_config, PREFIX + k, None) is not None}
    unknown = sorted(k for k in vars(hf_config) if k.startswith(PREFIX) and k[len(PREFIX):] not in ENGINE_KEYS)
    if unknown:
        raise ValueError(f"HiRED: unknown hf_overrides {unknown}; expected some of "
                         f"{[PREFIX + k for k in ENGINE_KEYS]}")
    return _checked(SelectionConfig(**given), "hf_overrides")


def split_request(kwargs) -> tuple[dict, dict]:
    """(HiRED keys without prefix, everything else) of a request's ``mm_processor_kwargs``."""
    ours = {k[len(PREFIX):]: v for k, v in kwargs.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(PREFIX)}
    return ours, rest


def request_selection(base: SelectionConfig, kwargs) -> SelectionConfig:
    """``base`` with a request's ``hired_*`` options applied (checked).

    ``hired_budget`` alone clears the engine's ``budget_tokens`` (the request asked for
    a fraction); ``hired_budget_tokens`` wins over both.
    """
    ours, _ = split_request(kwargs)
    unknown = sorted(set(ours) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"HiRED: unknown mm_processor_kwargs {[PREFIX + k for k in unknown]}; "
                         f"per request only {[PREFIX + k for k in REQUEST_KEYS]}")
    if not ours:
        return base
    if base.selector == "full":
        raise ValueError(f"HiRED: {[PREFIX + k for k in ours]} given but the engine's selector is 'full' "
                         "(stock LLaVA, every token); start the engine with another hired_selector")
    if "budget" in ours and "budget_tokens" not in ours:
        ours["budget_tokens"] = None
    return _checked(dataclasses.replace(base, **ours), "mm_processor_kwargs")


def _checked(sel: SelectionConfig, where: str) -> SelectionConfig:
    try:
        _check_types(sel)
        sel.check()
    except ValueError as e:
        raise ValueError(f"HiRED {where}: {e}") from None
    if sel.mode != "exact":
        raise ValueError(f"HiRED {where}: hired_mode must be 'exact' in vLLM, got {sel.mode!r} (reference "
                         "mode's token count depends on the attention, but vLLM places placeholders first)")
    return sel


def _check_types(sel: SelectionConfig) -> None:
    """Refuse strings and bools where numbers belong (JSON from ``--hf-overrides`` can carry them)."""
    for name, kinds in (("budget", (int, float)), ("alpha", (int, float)), ("budget_tokens", (int, type(None))),
                        ("seed", (int,))):
        v = getattr(sel, name)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"{PREFIX}{name} must be a number, got {v!r}")
