"""Benchmark presets: random-weight LLaVA-NeXT checkpoints at chosen sizes.

- ``tiny``: the test checkpoint (hired_batch.engine.tiny's widths); seconds to build.
- ``scaled``: the real LLaVA-NeXT token geometry (336 px crops, patch 14, 576 tokens
  per crop, the same anyres pinpoints) with widths chosen so the language model costs
  ~22x the vision tower per token, as in LLaVA-NeXT-7B, and a full-token item takes a
  few seconds on two CPU cores. Built once (~0.5 GB) and cached.
- ``llava-next-7b``: CLIP-L + Llama-7B shapes with random weights (14 GB in float16),
  for GPUs. Never built by tests; ``Preset.dims()`` gives its shapes to the ideal model
  without any weights.

Every preset reuses hired_batch.engine.tiny's tokenizer (904 tokens), processor and chat
template, so the vocabulary (and LM head) is small even in the 7B shapes. This module
does not download anything; checkpoints are written by ``ensure_checkpoint``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
from dataclasses import asdict, dataclass

from hired_batch.config import ConfigError
from hired_batch.engine import tiny
from hired_batch.engine.dims import LLAVA_FEATURE_LAYER, ModelDims, feature_layer_ids
from hired_batch.engine.dims import bytes_per_param as dims_bytes_per_param

TINY_VOCAB = 904  # len(build_tokenizer()): the trained BPE plus <image> and <pad>


@dataclass(frozen=True)
class Widths:
    """Sizes of one transformer stack (CLIP tower or Llama)."""

    hidden_size: int  # channels per token
    intermediate_size: int  # MLP inner width
    num_hidden_layers: int  # transformer blocks (CLIP: all of them; LLaVA runs up to -2)
    num_attention_heads: int  # query heads (head dim = hidden_size / heads)
    num_key_value_heads: int | None = None  # Llama only: KV heads (None = one per query head)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Preset:
    """A named model size for the bench."""

    name: str  # CLI name
    vision: Widths  # CLIP tower widths; geometry is always 336 px / patch 14 / 576 tokens
    text: Widths  # Llama widths
    dtype: str = "float32"  # dtype the weights are written in
    seed: int = 0  # weight seed (torch.manual_seed)
    kind: str = "llava_next"  # checkpoint layout (tiny.KINDS)
    note: str = ""  # one line for the bench header

    def widths(self) -> dict:
        """The ``widths`` argument of tiny.build_model."""
        return {"vision": self.vision.as_dict(), "text": self.text.as_dict()}

    def dims(self, bytes_per_param: int | None = None) -> ModelDims:
        """Shapes for the ideal model, without building anything (LLaVA's vision_feature_layer)."""
        bpp = bytes_per_param or dims_bytes_per_param(self.dtype)
        v, t = self.vision, self.text
        return ModelDims(
            v_hidden=v.hidden_size,
            v_intermediate=v.intermediate_size,
            v_heads=v.num_attention_heads,
            v_layers_run=max(feature_layer_ids(LLAVA_FEATURE_LAYER, v.num_hidden_layers)),
            t_hidden=t.hidden_size,
            t_intermediate=t.intermediate_size,
            t_layers=t.num_hidden_layers,
            t_heads=t.num_attention_heads,
            t_kv_heads=t.num_key_value_heads or t.num_attention_heads,
            vocab=TINY_VOCAB,
            image_size=tiny.IMAGE_SIZE,
            patch_size=tiny.PATCH_SIZE,
            bytes_per_param=bpp,
            is_next=self.kind == "llava_next",
        )


PRESETS = {
    "tiny": Preset("tiny", Widths(**tiny.VISION), Widths(**tiny.TEXT), note="test checkpoint, ~1 MB"),
    # Head dim 64 on both sides, Llama's MLP ratio (11008/4096 ~ 2.69), CLIP's 4x MLP.
    # 3 CLIP layers run (of 4) against 9 LM layers: weight FLOPs per token 21.4 : 1,
    # attention included (577-token crops, ~2950-token prompt) about the same. Widths
    # 1024 / 384 keep attention's share of each side's cost alike (~1/4 each).
    "scaled": Preset(
        "scaled",
        vision=Widths(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
        text=Widths(hidden_size=1024, intermediate_size=2752, num_hidden_layers=9, num_attention_heads=16),
        note="real geometry, LM:vision ~22:1, ~124M params (0.5 GB float32)",
    ),
    "llava-next-7b": Preset(
        "llava-next-7b",
        vision=Widths(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=Widths(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        dtype="float16",
        note="CLIP-L + Llama-7B shapes, random weights, ~7B params (14 GB float16); for GPUs",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def default_cache_dir() -> pathlib.Path:
    """~/.cache/hired_batch/presets (or $HIRED_BATCH_CACHE/presets)."""
    root = os.environ.get("HIRED_BATCH_CACHE") or pathlib.Path.home() / ".cache" / "hired_batch"
    return pathlib.Path(root) / "presets"


def ensure_checkpoint(name: str, cache_dir=None, quiet: bool = False) -> pathlib.Path:
    """The preset's checkpoint directory, built on first use and reused after.

    A directory counts as built when its ``preset.json`` equals this preset's spec;
    a build goes to a temporary sibling first and is renamed into place, so an
    interrupted build never looks complete.
    """
    preset = get_preset(name)
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / name
    spec = _spec(preset)
    if (path / "preset.json").is_file() and json.loads((path / "preset.json").read_text()) == spec:
        return path
    if not quiet:
        print(f"building preset {name!r} in {path} ({preset.note})", file=sys.stderr)
    tmp = root / f".{name}.building.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_checkpoint(preset, tmp)
    (tmp / "preset.json").write_text(json.dumps(spec, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _spec(preset: Preset) -> dict:
    return {**asdict(preset), "geometry": [tiny.IMAGE_SIZE, tiny.PATCH_SIZE, tiny.GRID_PINPOINTS]}


def build_checkpoint(preset: Preset, path) -> pathlib.Path:
    """Write the preset's random-weight checkpoint (tiny's tokenizer and processor)."""
    import torch

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(preset.kind, tokenizer, preset.seed, preset.widths())
    model.to(getattr(torch, preset.dtype))
    with tiny._no_progress_bars():
        model.save_pretrained(path)
        tiny.build_processor(preset.kind, tokenizer).save_pretrained(path)
    return path
