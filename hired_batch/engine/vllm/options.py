"""HiRED options in vLLM: per engine from the HF config (``hf_overrides``), per request
from ``mm_processor_kwargs``; both become a checked ``SelectionConfig``.

Engine keys (``hf_overrides``): ``hired_selector``, ``hired_budget``,
``hired_budget_tokens``, ``hired_alpha``, ``hired_seed``, ``hired_visionzip_contextual``, ``hired_mode`` (``exact``
only). Request keys (``mm_processor_kwargs``): ``hired_budget``,
``hired_budget_tokens``, ``hired_alpha``; they override the engine's for the images
of that request. Imports no vLLM, so it is testable and errors are plain ValueErrors.
"""

from __future__ import annotations

import dataclasses

from hired_batch.config import ConfigError, ModelConfig, SelectionConfig
from hired_batch.engine import selectors

PREFIX = "hired_"
ENGINE_KEYS = ("selector", "budget", "budget_tokens", "alpha", "seed", "mode", "visionzip_contextual")
REQUEST_KEYS = ("budget", "budget_tokens", "alpha")


def engine_selection(hf_config) -> SelectionConfig:
    """The engine-wide selection from ``hired_*`` attributes of the HF config (defaults otherwise).

    Raises ValueError for a value out of range, an unknown selector, or reference mode
    (its per-image count depends on attention, so placeholders cannot be placed first).
    """
    given = {k: getattr(hf_config, PREFIX + k) for k in ENGINE_KEYS if getattr(hf_config, PREFIX + k, None) is not None}
    unknown = sorted(k for k in vars(hf_config) if k.startswith(PREFIX) and k[len(PREFIX) :] not in ENGINE_KEYS)
    if unknown:
        raise ValueError(f"HiRED: unknown hf_overrides {unknown}; expected some of {[PREFIX + k for k in ENGINE_KEYS]}")
    return _checked(SelectionConfig(**given), "hf_overrides")


def split_request(kwargs) -> tuple[dict, dict]:
    """(HiRED keys without prefix, everything else) of a request's ``mm_processor_kwargs``."""
    ours = {k[len(PREFIX) :]: v for k, v in kwargs.items() if k.startswith(PREFIX)}
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
        raise ValueError(
            f"HiRED: unknown mm_processor_kwargs {[PREFIX + k for k in unknown]}; "
            f"per request only {[PREFIX + k for k in REQUEST_KEYS]}"
        )
    if not ours:
        return base
    if selectors.get(base.selector).stock:
        raise ValueError(
            f"HiRED: {[PREFIX + k for k in ours]} given but the engine's selector is {base.selector!r} "
            "(stock LLaVA, every token); start the engine with another hired_selector"
        )
    if "budget" in ours and "budget_tokens" not in ours:
        ours["budget_tokens"] = None
    return _checked(dataclasses.replace(base, **ours), "mm_processor_kwargs")


def _checked(sel: SelectionConfig, where: str) -> SelectionConfig:
    try:
        _check_types(sel)
        sel.check()
    except ValueError as e:
        raise ValueError(f"HiRED {where}: {e}") from None
    if not selectors.get(sel.selector).exact(sel):  # the count is only an upper bound (hired's reference mode)
        raise ValueError(
            f"HiRED {where}: hired_mode must be 'exact' in vLLM, got {sel.mode!r} (reference "
            "mode's token count depends on the attention, but vLLM places placeholders first)"
        )
    return sel


def _check_types(sel: SelectionConfig) -> None:
    """Refuse strings and bools where numbers belong (JSON from ``--hf-overrides`` can carry them)."""
    for name, kinds in (
        ("budget", (int, float)),
        ("alpha", (int, float)),
        ("budget_tokens", (int, type(None))),
        ("seed", (int,)),
    ):
        v = getattr(sel, name)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"{PREFIX}{name} must be a number, got {v!r}")


# --------------------------------------------------------------------------- our job's configuration -> vLLM

# CPU without --memory-limit: share of the host's available memory given to the KV cache.
# vLLM's own default (90 % of all memory) refuses to start on a host whose memory is in use.
CPU_KV_CACHE_SHARE = 0.25


# Head sizes vLLM's CPU attention runs (CPUAttentionBackend.get_supported_head_sizes in
# vllm/v1/attention/backends/cpu_attn.py); tests_vllm checks this copy against the
# installed vLLM. Another size fails on the first request and kills the engine.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def text_head_size(hf_config) -> int:
    """The language model's attention head size (``head_dim``, else hidden_size / heads)."""
    tc = getattr(hf_config, "text_config", None) or hf_config
    return int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)


def check_cpu_head_size(path: str) -> None:
    """ConfigError when vLLM's CPU attention cannot run the checkpoint at ``path``; a
    checkpoint that cannot be read is left to the model check."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return
    size = text_head_size(cfg)
    if size not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"--engine vllm on CPU: the model's attention head size is {size}, which vLLM's CPU "
            f"attention cannot run (it takes {', '.join(map(str, CPU_HEAD_SIZES))}); use --engine hf, "
            "a GPU, or another checkpoint (hired-batch tiny-model --vllm builds a tiny one)"
        )


def hf_overrides(selection: SelectionConfig, model_type: str) -> dict:
    """``hf_overrides`` that turn HiRED on for a checkpoint of ``model_type`` with ``selection``."""
    from hired_batch.engine.vllm import ARCH_OF_MODEL_TYPE

    if model_type not in ARCH_OF_MODEL_TYPE:
        raise ConfigError(f"the vLLM engine runs {sorted(ARCH_OF_MODEL_TYPE)} checkpoints, got {model_type!r}")
    given = {PREFIX + k: getattr(selection, k) for k in ENGINE_KEYS if getattr(selection, k) is not None}
    return {"architectures": [ARCH_OF_MODEL_TYPE[model_type]], **given}


def engine_kwargs(
    model: ModelConfig,
    selection: SelectionConfig,
    *,
    model_type: str,
    batch_size="auto",
    memory_limit: str | None = None,
    tensor_parallel_size: int = 1,
    gpu: bool = False,
) -> dict:
    """vLLM engine arguments (for ``LLM(**kw)`` or ``AsyncEngineArgs(**kw)``) from our configuration.

    - ``batch_size``: an int caps the sequences the engine runs at once (``max_num_seqs``);
      ``auto`` leaves vLLM's cap, so the KV-cache budget alone limits them.
    - ``memory_limit`` ("24GB"): the KV-cache budget (``kv_cache_memory_bytes``); None:
      vLLM's default on a GPU (a share of its memory), ``CPU_KV_CACHE_SHARE`` of the
      host's available memory on CPU.
    - ``model.dtype`` as our HF engine resolves it (``auto``: float16 on a GPU, float32 on CPU);
      ``model.max_model_len`` (None: the checkpoint's context); ``tensor_parallel_size``
      GPUs per engine (``mp`` executor inside the actor that holds them).
    - eager on CPU (compiling costs minutes there), CUDA graphs on a GPU; per-request
      metrics on (the job's timing columns come from them); one image per prompt.
    """
    from hired_batch.engine.batching import parse_bytes

    kw = dict(
        model=model.path,
        dtype=_dtype_name(model.dtype, gpu),
        hf_overrides=hf_overrides(selection, model_type),
        tensor_parallel_size=int(tensor_parallel_size),
        enforce_eager=not gpu,
        seed=0,
        disable_log_stats=False,
        limit_mm_per_prompt={"image": 1},
        # an image's questions (--ask) reuse its prefix's KV blocks; salted per selection (backend.cache_salt)
        enable_prefix_caching=True,
    )
    if model.max_model_len is not None:
        kw["max_model_len"] = int(model.max_model_len)
    if batch_size != "auto":
        kw["max_num_seqs"] = int(batch_size)
    if memory_limit is not None:
        kw["kv_cache_memory_bytes"] = parse_bytes(memory_limit)
    elif not gpu:
        import psutil

        kw["kv_cache_memory_bytes"] = int(psutil.virtual_memory().available * CPU_KV_CACHE_SHARE)
    if int(tensor_parallel_size) > 1:
        kw["distributed_executor_backend"] = "mp"  # the actor's own GPUs, no nested Ray placement
    return kw


def _dtype_name(dtype: str, gpu: bool) -> str:
    """Our ``--dtype`` as vLLM's name, ``auto`` resolved as the HF engine resolves it."""
    import torch

    from hired_batch.engine.weights import resolve_dtype

    return str(resolve_dtype(dtype, torch.device("cuda" if gpu else "cpu"))).removeprefix("torch.")
