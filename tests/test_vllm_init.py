"""The vLLM plugin package (``hired_batch.engine.vllm``): CLIP weight names as stock vLLM
loads them, and an import light enough for every process vLLM starts. No vLLM needed."""

import subprocess
import sys

import pytest

from hired_batch.engine.vllm import hub_clip_name, stock_checkpoint


@pytest.mark.parametrize(
    "name, hub",
    [
        (
            "vision_tower.embeddings.patch_embedding.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
        ),
        (
            "model.vision_tower.encoder.layers.0.mlp.fc1.bias",
            "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
        ),
        ("vision_tower.vision_model.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.weight"),
        ("language_model.lm_head.weight", "language_model.lm_head.weight"),
    ],
)
def test_hub_clip_name_adds_vision_model_to_clip_names_only(name, hub):
    assert hub_clip_name(name) == hub


def test_stock_checkpoint_renames_clip_weights_once(tiny_next, tmp_path):
    """Stock vLLM 0.32 loads hub names (vision_tower.vision_model....), not the names
    transformers 5 saves: the bench hands it a renamed copy, built once under cache_root;
    a checkpoint already in hub names is used as it is."""
    from safetensors.torch import load_file

    copy = stock_checkpoint(str(tiny_next), cache_root=tmp_path)
    assert copy != str(tiny_next)
    ours, theirs = load_file(tiny_next / "model.safetensors"), load_file(f"{copy}/model.safetensors")
    assert len(ours) == len(theirs) and any(".vision_model." in k for k in theirs)
    assert not any(k.startswith(("vision_tower.embeddings", "model.vision_tower.embeddings")) for k in theirs)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())
    assert (tmp_path / copy.rsplit("/", 1)[1] / "config.json").is_file()
    assert stock_checkpoint(str(tiny_next), cache_root=tmp_path) == copy  # built once
    assert stock_checkpoint(copy, cache_root=tmp_path) == copy  # already hub names


def test_importing_the_plugin_package_loads_no_model_library():
    """vLLM imports the package in every process it starts: safetensors, torch and vLLM
    load only when a function needs them."""
    code = (
        "import sys, hired_batch.engine.vllm; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('safetensors', 'torch', 'vllm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
