"""Shared fixtures: tiny random-weight checkpoints built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on our machines; fail fast if touched
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory):
    from hired_batch.engine.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next", "llava_next")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from hired_batch.engine.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", "llava")
