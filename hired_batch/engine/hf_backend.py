"""The HF engine (``engine/hf.py``) behind the backend seam (``backends.py``).

Handoff: the image as the smaller of its encoded bytes and its uint8 anyres crops
(``handoff.pack_pixels``); the float32 pixel values are made in the generation actor.
Per Ray batch the runner groups rows of similar prompt length (left padding grows every
row to the longest), at most ``batch_size`` per ``generate`` call; a call that runs out
of memory is split in halves down to single rows, one that raises anything else is
retried row by row (``batching.halve_on_oom``). Rows with their own generation options
(``sampling``) run in calls of their own, one per set of options. Rows that share an
image (``backends.SHARE``: several questions asked of it) get its vision pass once, before
any call, and continue its prefix KV cache (``HiredEngine.encode_shared``). No Ray here.
"""

from __future__ import annotations

import importlib
import os
import time

import numpy as np
import pyarrow as pa

from hired_batch.engine import backends, handoff
from hired_batch.engine.batching import halve_on_oom
from hired_batch.engine.inputs import exception_error

# "module:callable" building the hf engine in place of HiredEngine.load, called with
# (ModelConfig, SelectionConfig, GenerationConfig): a seam for tests and experiments that
# need a fake engine inside the job's Ray actors (they import this module afresh).
ENGINE_FACTORY_ENV = "HIRED_BATCH_ENGINE_FACTORY"


def engine_factory():
    """What builds the engine: ``HiredEngine.load``, or the callable ``ENGINE_FACTORY_ENV`` names."""
    spec = os.environ.get(ENGINE_FACTORY_ENV)
    if not spec:
        from hired_batch.engine.hf import HiredEngine

        return HiredEngine.load
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def encode(pre, image, question) -> dict:
    """One row's handoff: prompt ids, image size, and the image as the smaller of its
    encoded bytes and its uint8 crops (``handoff.pack_pixels``); no float pixels."""
    return dict(
        input_ids=pre.prompt_ids(question).tobytes(),
        image_h=int(image.height),
        image_w=int(image.width),
        **handoff.pack_pixels(pre, image),
    )


DEFAULT_CONTEXT = 4096  # positions assumed for a language model whose config names none


def max_positions(cfg) -> int:
    """Tokens the HF engine's context holds for a LLaVA config (prompt + answer)."""
    return int(getattr(cfg.text_config, "max_position_embeddings", None) or DEFAULT_CONTEXT)


class HfRunner:
    """A loaded ``HiredEngine`` driven a Ray batch at a time (``backends.Runner``)."""

    def __init__(self, engine, batch_size: int | str | None = None, memory_limit: str | None = None):
        self.engine = engine  # a HiredEngine (or a stand-in with its interface)
        self.batch_size = batch_size  # None: the whole Ray batch at once
        self.memory_limit = memory_limit
        self.max_positions = max_positions(engine.cfg)
        self.max_new_tokens = engine.generation.max_new_tokens
        self._dims = None  # dims.ModelDims, built on the first auto-sized batch
        self._calls = 0

    def planned_item(self, image_size, n_prompt_ids: int):
        return self.engine.planned_item(image_size, n_prompt_ids)

    async def generate(self, rows: list[dict]) -> list[dict]:
        """``backends.Runner.generate``: grouped calls, halved on out-of-memory."""
        from hired_batch.engine.batching import group_by_count

        out = [{} for _ in rows]
        shared = self._shared(rows)  # share key -> SharedImage: one vision pass per image
        for same in self._by_options(rows):  # one generate call runs one set of options
            sub = [rows[i] for i in same]
            g = sub[0].get("generation")
            size = (
                self._auto_size([r["item"] for r in sub], g)
                if self.batch_size == "auto"
                else (self.batch_size or len(sub))
            )
            for group in group_by_count([r["item"].n_prompt for r in sub], size):
                self._run(rows, [same[j] for j in group], out, g, shared)
        return out

    def _shared(self, rows) -> dict:
        """The images several rows share (``backends.SHARE``), each through the vision
        tower once, ``batch_size`` images per call; {} when no row shares one."""
        first = {}
        for r in rows:
            if backends.SHARE in r:
                first.setdefault(r[backends.SHARE], r)
        keys = list(first)
        size = self.batch_size if isinstance(self.batch_size, int) else len(keys)
        images = {}
        for start in range(0, len(keys), max(1, size)):
            chunk = keys[start : start + size]
            images.update(zip(chunk, self.engine.encode_shared([self._prepared(first[k]) for k in chunk])))
        return images

    @staticmethod
    def _by_options(rows) -> list[list[int]]:
        """Row indices grouped by their generation options (None: the job's), in first-seen order."""
        groups = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.get("generation"), []).append(i)
        return list(groups.values())

    def _run(self, rows, idx: list[int], out: list[dict], generation=None, shared=None) -> None:
        def alone(i, exc):
            out[i] = dict(error=f"out of memory even alone: {type(exc).__name__}")

        def broke(i, exc):
            out[i] = dict(error=exception_error("generate: ", exc), exception=exc)

        halve_on_oom(lambda sub: self._generate(rows, sub, out, generation, shared), idx, alone, broke)

    def _auto_size(self, items, generation=None) -> int:
        """The largest batch that fits the memory limit, sized on the worst case of ``items``."""
        from hired_batch.engine.batching import auto_batch_size, memory_limit
        from hired_batch.engine.dims import ModelDims, bytes_per_param

        if self._dims is None:  # constant per actor
            self._dims = ModelDims.from_hf(self.engine.cfg, bytes_per_param=bytes_per_param(self.engine.model.dtype))
        limit = memory_limit(self.memory_limit, device=str(self.engine.device))
        try:
            n_new = generation.max_new_tokens if generation else self.max_new_tokens
            return auto_batch_size(self._dims, items, n_new, limit, vision_chunk=self.engine.vision_chunk)
        except ValueError:
            return 1  # not even one fits by the estimate: try singly, OOM makes error rows

    def _pixels(self, row) -> np.ndarray:
        """float32 pixel values of one handoff row, made here from its encoded image or
        uint8 crops (``handoff.pixel_values``), by the engine's own processor."""
        return handoff.pixel_values(self.engine.pre, row["image"], str(row["image_kind"]), int(row["n_parts"]))

    def _prepared(self, row, pixels: bool = True):
        """A handoff row as the engine's ``Prepared`` (``pixels=False``: ids only, the image is shared)."""
        from hired_batch.engine.weights import Prepared

        # bytearray: one copy into writable memory (torch refuses read-only buffers)
        return Prepared(
            np.frombuffer(bytearray(row["input_ids"]), dtype=np.int64),
            self._pixels(row) if pixels else None,
            np.array([row["image_h"], row["image_w"]], dtype=np.int64),
        )

    def _generate(self, rows, idx, out, generation=None, shared=None) -> None:
        images = [shared[rows[i][backends.SHARE]] for i in idx] if shared else None
        prepared = [self._prepared(rows[i], pixels=images is None) for i in idx]
        t0 = time.perf_counter()
        # the job's options: the engine's own (a stand-in engine may take no options)
        if images is not None:
            res = self.engine.generate_prepared(prepared, generation, shared=images)
        elif generation:
            res = self.engine.generate_prepared(prepared, generation)
        else:
            res = self.engine.generate_prepared(prepared)
        t_batch = time.perf_counter() - t0
        self._calls += 1
        for i, item in zip(idx, res.items):
            out[i] = dict(
                item,
                call=self._calls,
                batch_size=len(idx),
                t_vision_s=res.t_vision_s,
                t_prefill_s=res.t_prefill_s,
                t_decode_s=res.t_decode_s,
                t_batch_s=t_batch,
            )


def start(
    model, selection, generation, *, batch_size=None, memory_limit=None, tensor_parallel_size=1, engine=None
) -> HfRunner:
    """``Backend.start``: load the engine (or take ``engine``) and wrap it."""
    return HfRunner(engine or engine_factory()(model, selection, generation), batch_size, memory_limit)


BACKEND = backends.register(
    backends.Backend(
        name="hf",
        encode=encode,
        start=start,
        handoff={
            "image": pa.binary(),  # handoff.pack_pixels: encoded bytes or uint8 (n_parts, 3, H, W) crops
            "image_kind": pa.string(),  # handoff.ENCODED or handoff.CROPS
            "n_parts": pa.int64(),
        },
    )
)
