"""Generation engines for ``HIRED_BATCH_ENGINE_FACTORY`` (``engine.hf_backend.ENGINE_FACTORY_ENV``):
the real hf engine behind start-up failures, for jobs run as child processes. Each start
is appended to the file ``STARTS_ENV`` names, so a test counts them across the actors'
processes."""

from __future__ import annotations

import os

STARTS_ENV = "HIRED_BATCH_TEST_ENGINE_STARTS"
ALWAYS = "Unsupported CPU attention configuration: head_dim=16 (fake engine)"


def _count_start() -> int:
    with open(os.environ[STARTS_ENV], "a") as f:
        f.write("start\n")
    with open(os.environ[STARTS_ENV]) as f:
        return len(f.read().splitlines())


def always_fails(model, selection, generation):
    """Fails at every start with the same error (a checkpoint the engine cannot run)."""
    _count_start()
    raise RuntimeError(ALWAYS)


def fails_once(model, selection, generation):
    """Fails the job's first start only (a device busy for a moment), then the real engine."""
    from hired_batch.engine.hf import HiredEngine

    if _count_start() == 1:
        raise RuntimeError("the device is busy (fake engine, first start only)")
    return HiredEngine.load(model, selection, generation)
