"""A fake ``vllm`` module for tests of the install checks, in a Python without vLLM (or
with it: the fake replaces it for the test)."""

from __future__ import annotations

import importlib.machinery
import sys
import types


def install_fake_vllm(monkeypatch, error: BaseException | None, found: tuple[str, str]) -> None:
    """Make ``from vllm import LLM`` raise ``error`` (or succeed when None) and the installed
    vLLM distribution read as ``found`` (distribution, version), until the test ends."""
    # transformers' model classes look for an installed vLLM when they first import: import
    # them before the fake exists, so that it breaks vLLM alone, as a broken vLLM install does
    from transformers import LlamaConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration  # noqa: F401

    import hired_batch.engine.vllm as plugin

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec("vllm") finds it

    def getattr_(name):
        if error is not None:
            raise error
        return object()

    module.__getattr__ = getattr_
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(plugin, "installed_vllm", lambda: found)
