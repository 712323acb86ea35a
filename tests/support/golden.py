"""The published code's golden files (tests/data/*_golden.json): the script that made them
and the tiny checkpoint they were made on, rebuilt here and checked against its digest."""

from __future__ import annotations

import importlib.util
import json
import pathlib

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def golden_script():
    """tests/data/make_reference_golden.py as a module (its weights digest, its seeded pixels)."""
    spec = importlib.util.spec_from_file_location("make_reference_golden", DATA / "make_reference_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_file(name: str) -> dict:
    """tests/data/NAME as JSON."""
    return json.loads((DATA / name).read_text())


def golden_checkpoint(tmp_path_factory, golden: dict):
    """The 16-head, 24-layer tiny checkpoint ``golden`` was made on, rebuilt and loaded."""
    from safetensors.torch import load_file

    from hired_batch.config import ModelConfig
    from hired_batch.engine.tiny import build_tiny_checkpoint
    from hired_batch.engine.weights import load_llava

    ck = golden["checkpoint"]
    path = build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-24x16", "llava_next", seed=ck["seed"], widths=ck["widths"]
    )
    digest = golden_script().weights_digest(load_file(str(path / "model.safetensors")))
    assert digest == ck["weights_sha256"], "hired_batch.engine.tiny no longer builds the golden file's checkpoint"
    return load_llava(ModelConfig(path=str(path)))
