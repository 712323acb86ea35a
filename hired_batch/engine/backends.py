"""The backend seam: what an engine declares to the job, and the registry by name.

A backend is one module that calls ``register`` with a ``Backend`` (the HF engine:
``engine/hf_backend.py``; vLLM: ``engine/vllm/backend.py``). The job layer knows only
this module: the preprocessing stage writes the chosen backend's handoff columns
(``handoff_types``) through its ``encode``, and the one generation stage calls the
``Runner`` its ``start`` returns, one ``generate`` per Ray batch. No Ray here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import pyarrow as pa

# Handoff columns every backend has: the row, its error, and what the token plan needs
# (prompt ids, image size) so that the generation stage checks the context alike.
COMMON_HANDOFF = {
    "id": pa.string(),
    "error": pa.string(),
    "input_ids": pa.binary(),  # int64 token ids, one <image> placeholder
    "image_h": pa.int64(),
    "image_w": pa.int64(),
    "t_preprocess_s": pa.float64(),
    # the row's own generation options (JSON, ``generation_rules.row_generation``); null: the job's
    "sampling": pa.string(),
}

# A runner row's key naming the image it shares with other rows (several questions asked of
# one image, job/ask.py): rows with equal values carry the same image, which the runner
# encodes once, and whose prompt prefix (system prompt + image tokens) it prefills once.
SHARE = "share"

# The backends that ship, by name -> the module that registers it (imported on first ``get``).
BUILTIN = {"hf": "hired_batch.engine.hf_backend", "vllm": "hired_batch.engine.vllm.backend"}


class EngineDead(RuntimeError):
    """Raised by a runner whose engine can no longer serve any row (its cause is the
    engine's error): the job restarts the actor instead of writing error rows."""


class Runner(Protocol):
    """A started engine as the generation stage drives it (one per actor)."""

    max_positions: int  # tokens the engine's context holds (prompt + answer)
    max_new_tokens: int

    def planned_item(self, image_size, n_prompt_ids: int):
        """``token_plan.item_tokens`` of one row, before it runs."""

    async def generate(self, rows: list[dict]) -> list[dict]:
        """Answer handoff ``rows`` (column -> value dicts, plus ``item``: its planned
        tokens, and ``generation``: its own GenerationConfig, None for the job's; rows with
        equal ``SHARE`` values hold one image: encode it once). One dict per row, in order: the output columns it fills (``answer``,
        token counts, timings, ``batch_size``, ``call``: the engine call's number), or
        ``error`` (and ``exception``: what it raised alone, when it raised). Raises
        ``EngineDead`` when the engine cannot serve any more."""


@dataclass(frozen=True)
class Backend:
    """One engine as the job sees it."""

    name: str
    # handoff columns beyond COMMON_HANDOFF -> Arrow type (as small as the engine allows)
    handoff: dict
    # (Preprocessor, decoded PIL image, question) -> one row's handoff values; may raise
    # checkpoint.PromptError (an error row)
    encode: Callable
    # (ModelConfig, SelectionConfig, GenerationConfig, *, batch_size, memory_limit,
    # tensor_parallel_size, engine) -> Runner; ``engine``: an already loaded engine (tests)
    start: Callable
    # Ray batches each actor runs at once (its runner awaits them together); None: one
    # at a time, Ray Data's defaults
    batches_in_flight: int | None = None
    # (model path) -> None, or ConfigError when the engine cannot run the model on CPUs
    # (checked once the job knows its cluster has no GPU for the actors)
    check_on_cpu: Callable | None = None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Make ``backend`` available to ``get`` under its name (called by its own module)."""
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The backend registered as ``name`` (importing a built-in one's module first)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"engine must be one of {sorted(set(BUILTIN) | set(_REGISTRY))}, got {name!r}")
    return _REGISTRY[name]


def handoff_types(backend: Backend) -> dict:
    """The preprocessing stage's output columns for ``backend``, with their Arrow types."""
    return {**COMMON_HANDOFF, **backend.handoff}


def empty_value(arrow_type):
    """A handoff column's value in an error row."""
    if pa.types.is_binary(arrow_type):
        return b""
    if pa.types.is_string(arrow_type):
        return None
    return 0.0 if pa.types.is_floating(arrow_type) else 0
