"""Ray Data stages: CPU preprocessing and GPU generation, one callable class each.

Each stage declares the columns it reads. Per-row data problems (bad image, empty
question, prompt too long for the model) become rows with ``error`` set; they never
fail a batch. So does anything else one row raises (the error names the stage and the
exception), unless every row of the batch raised the same type: that is no data
problem but a bug or a broken engine, and it raises (``raise_if_systematic``).

This module does not build the pipeline or set resources (see ``pipeline.py``, ``resources.py``).
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow as pa

from hired_batch.config import (QUESTION_FIELD, ColumnSpec, ConfigError, DecodeLimits, GenerationConfig, ModelConfig,
                                SelectionConfig)
from hired_batch.engine.inputs import decode_image, exception_error, validate_question
from hired_batch.engine.batching import halve_on_oom
from hired_batch.job.engine_health import engine_died, served, start_engine
from hired_batch.engine.prompts import render_template, template_fields, template_names

# Columns the preprocessing stage hands to the generation stage (internal), typed so
# an all-null column stays a string column.
PRE_TYPES = {
    "id": pa.string(), "error": pa.string(), "input_ids": pa.binary(),  # int64 token ids
    "pixel_values": pa.binary(),  # hf engine: float32 (n_parts, 3, H, W)
    "rgb": pa.binary(),  # vllm engine: the decoded image, uint8 (image_h, image_w, 3); vLLM makes its pixels
    "n_parts": pa.int64(), "image_h": pa.int64(), "image_w": pa.int64(), "t_preprocess_s": pa.float64(),
}


def check_prompt(c: ColumnSpec) -> ColumnSpec:
    """``c.check()``, and ``c.prompt`` parsed as a template: ConfigError on an unknown
    field or a lone brace, or on {question} without a question column; returns ``c``."""
    c.check()
    if c.prompt is not None:
        if c.question_column is None and QUESTION_FIELD in template_names(c.prompt, "--prompt"):
            raise ConfigError(f"--prompt {c.prompt!r} uses {{{QUESTION_FIELD}}} but --question-column is none, "
                              f"so there is no question to insert; drop {{{QUESTION_FIELD}}} or name the "
                              "question column")
        template_fields(c.prompt, "--prompt", allowed=c.prompt_fields_allowed)
    return c


def question_for(c: ColumnSpec, raw, limits: DecodeLimits = DecodeLimits(),
                 fields: dict | None = None) -> tuple[str | None, str | None]:
    """Build the question text of one row under column mapping ``c``; (text, None) or
    (None, error).

    ``fields``: the row's ``c.prompt_columns`` values, for a task preset's template; the
    question (from ``c.question_column``, which may differ from the preset's) fills the
    template's question slot.
    """
    if c.question_column is None:
        return render_template(c.prompt, {}), None
    q, err = validate_question(raw, limits=limits)
    if err:
        return None, err
    if c.task:
        from hired_batch.job.tasks import get_task, render_prompt

        preset = get_task(c.task)
        return render_prompt(preset, {**(fields or {}), preset.question_column: q}), None
    if c.prompt:
        if QUESTION_FIELD in template_fields(c.prompt, "--prompt"):
            return render_template(c.prompt, {QUESTION_FIELD: q}), None
        return f"{q}\n{render_template(c.prompt, {})}", None  # a fixed instruction follows the question
    return q, None


KEPT_PREFIX = "keep__"  # a kept column's name between the stages


def pack_kept(table: pa.Table, keep_columns: tuple) -> pa.Table:
    """Add ``keep__NAME``, each kept column's values pickled one per row (a Ray Data map,
    ``batch_format="pyarrow"``, before the stages).

    The stages get numpy batches, and Ray's Arrow-to-numpy conversion changes values: an
    integer column with nulls becomes float with NaN (integers above 2**53 rounded), and
    so do integers inside lists and structs. Pickled Python values pass through numpy
    unchanged; the generation stage rebuilds the column with the input's Arrow type
    (``_OutputRows``, given ``keep_columns`` as a schema)."""
    import pickle

    for k in keep_columns:
        values = [pickle.dumps(v) for v in table.column(k).to_pylist()]
        table = table.append_column(f"{KEPT_PREFIX}{k}", pa.array(values, pa.binary()))
    return table


def output_name(column: str) -> str:
    """Name a kept column gets in the output (gt_ prefix only on a clash)."""
    return f"gt_{column}" if column in OUTPUT_FIELDS else column


class PreprocessStage:
    """CPU: decode and validate each row, build prompt ids and anyres pixel values.

    Reads: id, image, question (per ColumnSpec). Loads only the processor.
    ``system_prompt``: ``GenerationConfig.system_prompt``, put before every question.
    """

    def __init__(self, model_path: str, columns: ColumnSpec, limits: DecodeLimits = DecodeLimits(),
                 system_prompt: str | None = None, engine: str = ModelConfig.engine):
        from hired_batch.engine.checkpoint import Preprocessor
        from hired_batch.job.sources import configure_s3_retries

        configure_s3_retries()  # image URLs on s3:// read with the job's retry policy in this actor
        self.pre = Preprocessor.from_pretrained(model_path, system_prompt)
        self.columns = columns
        self.limits = limits
        self.engine = engine  # which generation engine the rows are prepared for

    def __call__(self, batch: dict) -> pa.Table:
        c = self.columns
        n = len(batch[c.id_column])
        rows, failures = [], {}
        for i in range(n):
            try:
                rows.append(self._one(batch, i))
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's error
                failures[i] = e
                rows.append(dict(self._empty_row(batch, i), error=exception_error("preprocess: ", e)))
        raise_if_systematic(failures, n)
        table = {k: pa.array([r[k] for r in rows], type=t) for k, t in PRE_TYPES.items()}
        for k in c.keep_columns:  # packed by ``pack_kept`` in the pipeline; as they are when called directly
            packed = f"{KEPT_PREFIX}{k}" in batch
            table[f"{KEPT_PREFIX}{k}"] = pa.array(list(batch[f"{KEPT_PREFIX}{k}"]), pa.binary()) if packed \
                else list(batch[k])
        return pa.table(table)

    def _empty_row(self, batch, i) -> dict:
        return dict(id=str(batch[self.columns.id_column][i]), error=None, input_ids=b"", pixel_values=b"", rgb=b"",
                    n_parts=0, image_h=0, image_w=0, t_preprocess_s=0.0)

    def _one(self, batch, i) -> dict:
        from hired_batch.engine.checkpoint import PromptError

        t0 = time.perf_counter()
        c = self.columns
        row = self._empty_row(batch, i)
        fields = {k: batch[k][i] for k in c.prompt_columns}
        question, err = question_for(c, batch[c.question_column][i] if c.question_column else None,
                                       self.limits, fields)
        image, img_err = decode_image(batch[c.image_column][i], limits=self.limits,
                                      storage_options=c.storage_options)
        row["error"] = img_err or err
        try:
            if row["error"] is None and self.engine == "vllm":
                row.update(input_ids=self.pre.prompt_ids(question).tobytes(),
                           rgb=np.asarray(image, np.uint8).tobytes(), image_h=image.height, image_w=image.width)
            elif row["error"] is None:
                p = self.pre(image, question)
                row.update(input_ids=p.input_ids.tobytes(), pixel_values=p.pixel_values.tobytes(),
                           n_parts=int(p.pixel_values.shape[0]), image_h=int(p.image_size[0]),
                           image_w=int(p.image_size[1]))
        except PromptError as e:  # the question's text holds the image token
            row["error"] = str(e)
        row["t_preprocess_s"] = time.perf_counter() - t0
        return row


def raise_if_systematic(failures: dict, n_rows: int) -> None:
    """Re-raise when every one of a batch's ``n_rows`` rows failed with the same exception
    type (``failures``: {row: exception}): a bug or a broken engine, not bad data, and an
    error row for every input would hide it. Otherwise the failed rows stay error rows."""
    if n_rows and len(failures) == n_rows and len({type(e) for e in failures.values()}) == 1:
        raise next(iter(failures.values()))


# Output columns, in order, with their Arrow types (docs/guarantees.md documents each).
OUTPUT_FIELDS = {
    "id": pa.string(), "answer": pa.string(), "error": pa.string(), "model": pa.string(),
    "selector": pa.string(), "mode": pa.string(), "budget": pa.float64(),
    "n_visual_tokens_full": pa.int64(), "n_visual_tokens_kept": pa.int64(),
    "n_prompt_tokens": pa.int64(), "n_generated_tokens": pa.int64(),
    "batch_id": pa.string(), "batch_size": pa.int64(), "t_preprocess_s": pa.float64(),
    "t_vision_s": pa.float64(), "t_prefill_s": pa.float64(), "t_decode_s": pa.float64(),
    "t_batch_s": pa.float64(), "worker": pa.string(),
}


class _OutputRows:
    """What both generation stages share: the output row of an input row, the context
    check and the output table. Subclasses call ``__init__`` once their engine is up."""

    def __init__(self, model: ModelConfig, selection: SelectionConfig, keep_columns: tuple, *,
                 max_positions: int, max_new_tokens: int):
        self.model_name = model.path
        self.selection = selection
        # names, or a schema of them (rows packed by ``pack_kept``: rebuilt with these types)
        self.keep_schema = keep_columns if isinstance(keep_columns, pa.Schema) else None
        self.keep_columns = tuple(keep_columns.names if self.keep_schema is not None else keep_columns)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.max_positions = max_positions  # tokens the engine's context holds (prompt + answer)
        self.max_new_tokens = max_new_tokens
        self.n_batches = 0

    def _base_row(self, batch, i) -> dict:
        row = {k: None for k in OUTPUT_FIELDS}
        s = self.selection
        row.update(id=str(batch["id"][i]), error=_none_if_empty(batch["error"][i]), model=self.model_name,
                   selector=s.selector, mode=s.mode, budget=float(s.budget_arg),
                   t_preprocess_s=float(batch["t_preprocess_s"][i]), worker=self.worker)
        return row

    def _fits(self, item, row) -> bool:
        """Refuse prompts the model's context cannot hold (visual + text + answer)."""
        need = item.n_prompt + self.max_new_tokens
        if need <= self.max_positions:
            return True
        row["error"] = f"question: prompt too long ({need} tokens with image and answer > context {self.max_positions})"
        return False

    def _table(self, batch, out) -> pa.Table:
        cols = {k: pa.array([r[k] for r in out], type=t) for k, t in OUTPUT_FIELDS.items()}
        if self.selection.return_indices:
            cols["kept_indices"] = pa.array([r.get("kept_indices") for r in out], pa.list_(pa.int64()))
        for k in self.keep_columns:
            values = batch[f"{KEPT_PREFIX}{k}"]
            cols[output_name(k)] = _arrow_column(values) if self.keep_schema is None else \
                _unpacked(values, self.keep_schema.field(k).type)
        return pa.table(cols)


def _n_prompt_ids(batch, i) -> int:
    return len(batch["input_ids"][i]) // np.dtype(np.int64).itemsize  # int64 token ids stored as bytes


def _image_size(batch, i) -> tuple[int, int]:
    return int(batch["image_h"][i]), int(batch["image_w"][i])


class GenerateStage(_OutputRows):
    """GPU actor: HiRED-pruned generation for batches of preprocessed rows.

    Reads: the PRE_TYPES and keep__* columns. The model loads once per actor.
    A batch that runs out of memory is split in halves and retried, down to single
    items; one that raises anything else is retried item by item. An item that fails
    alone becomes an error row (unless all did alike: ``raise_if_systematic``).
    """

    def __init__(self, model: ModelConfig, selection: SelectionConfig, generation: GenerationConfig,
                 keep_columns: tuple = (), engine=None, batch_size: int | str | None = None,
                 memory_limit: str | None = None, health=None):
        # health: the job's engine_health.FailureLog actor (None without Ray): bounds restarts
        self.engine = engine or start_engine(lambda: engine_factory()(model, selection, generation), health)
        super().__init__(model, selection, keep_columns, max_positions=_max_positions(self.engine),
                         max_new_tokens=self.engine.generation.max_new_tokens)
        self.batch_size = batch_size  # None: the whole Ray batch at once
        self.memory_limit = memory_limit
        self._dims = None  # dims.ModelDims, built on the first auto-sized batch

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["id"])
        out = [self._base_row(batch, i) for i in range(n)]
        # token plan per row, computed once: the context check and the grouping share it
        items = {i: self._item_tokens(batch, i) for i in range(n) if out[i]["error"] is None}
        todo = [i for i in items if self._fits(items[i], out[i])]
        failures = {}  # row -> what it raised alone (not out of memory)
        for group in self._groups(todo, [items[i] for i in todo]):
            self._run(batch, group, out, failures)
        raise_if_systematic(failures, len(todo))
        return self._table(batch, out)

    def _groups(self, todo: list[int], items: list) -> list[list[int]]:
        """Generate calls for this Ray batch: rows of similar prompt length together
        (left padding grows every row to the longest), at most batch_size each."""
        from hired_batch.engine.batching import group_by_count

        if not todo:
            return []
        size = self._auto_size(items) if self.batch_size == "auto" else (self.batch_size or len(todo))
        return [[todo[j] for j in g] for g in group_by_count([it.n_prompt for it in items], size)]

    def _item_tokens(self, batch, i):
        return self.engine.planned_item(_image_size(batch, i), _n_prompt_ids(batch, i))

    def _auto_size(self, items) -> int:
        """The largest batch that fits the memory limit, sized on the worst case of ``items``."""
        from hired_batch.engine.dims import ModelDims, bytes_per_param
        from hired_batch.engine.batching import auto_batch_size, memory_limit

        if self._dims is None:  # constant per actor
            self._dims = ModelDims.from_hf(self.engine.cfg, bytes_per_param=bytes_per_param(self.engine.model.dtype))
        limit = memory_limit(self.memory_limit, device=str(self.engine.device))
        try:
            return auto_batch_size(self._dims, items, self.engine.generation.max_new_tokens, limit,
                                   vision_chunk=self.engine.vision_chunk)
        except ValueError:
            return 1  # not even one fits by the estimate: try singly, OOM makes error rows

    def _run(self, batch, idx: list[int], out: list[dict], failures: dict) -> None:
        """Generate for rows idx; halve the batch on out-of-memory, run it item by item on
        any other error (``batching.halve_on_oom``); what an item raises alone goes to
        ``failures`` and its row's error."""
        def alone(i, exc):
            out[i]["error"] = f"out of memory even alone: {type(exc).__name__}"

        def broke(i, exc):
            failures[i] = exc
            out[i]["error"] = exception_error("generate: ", exc)

        halve_on_oom(lambda sub: self._generate(batch, sub, out), idx, alone, broke)

    def _generate(self, batch, idx, out) -> None:
        from hired_batch.engine.checkpoint import Prepared

        # bytearray: one copy into writable memory (torch refuses read-only buffers)
        prepared = [Prepared(np.frombuffer(bytearray(batch["input_ids"][i]), dtype=np.int64),
                             np.frombuffer(bytearray(batch["pixel_values"][i]), dtype=np.float32).reshape(
                                 int(batch["n_parts"][i]), 3, *self._hw()),
                             np.array([batch["image_h"][i], batch["image_w"][i]], dtype=np.int64))
                    for i in idx]
        t0 = time.perf_counter()
        res = self.engine.generate_prepared(prepared)
        t_batch = time.perf_counter() - t0
        self.n_batches += 1
        bid = f"{self.worker}/{self.n_batches}"
        for i, item in zip(idx, res.items):
            out[i].update(item, batch_id=bid, batch_size=len(idx), t_vision_s=res.t_vision_s,
                          t_prefill_s=res.t_prefill_s, t_decode_s=res.t_decode_s, t_batch_s=t_batch)

    def _hw(self) -> tuple[int, int]:
        side = self.engine.cfg.vision_config.image_size
        return side, side


class VllmGenerateStage(_OutputRows):
    """Generation actor on vLLM (``--engine vllm``): one engine per actor, kept full.

    ``__call__`` is a coroutine (an async generator): Ray Data runs several calls at
    once in each actor (``pipeline.VLLM_BATCHES_IN_FLIGHT``), each submits its rows to
    the one engine and waits for their answers, so vLLM's scheduler always has rows of
    several Ray batches to run together and admits a new row as soon as one finishes
    (continuous batching across Ray batches). Reads what ``GenerateStage`` reads, with
    ``rgb`` in place of ``pixel_values``.

    A row vLLM refuses (its processor rejects the image, or anything else it raises for
    that request) becomes an error row; the engine keeps serving. A dead engine ends the
    actor's process, so Ray restarts the actor and retries its batches, unless it died
    of the same error last time (``engine_health``: then the job ends).
    """

    def __init__(self, model: ModelConfig, selection: SelectionConfig, generation: GenerationConfig,
                 keep_columns: tuple = (), batch_size: int | str = "auto", memory_limit: str | None = None,
                 tensor_parallel_size: int = 1, health=None):
        from hired_batch.engine.vllm.backend import VllmBackend

        self.health = health  # the job's engine_health.FailureLog actor (None without Ray)
        self.backend = start_engine(lambda: VllmBackend(
            model, selection, generation, batch_size=batch_size, memory_limit=memory_limit,
            tensor_parallel_size=tensor_parallel_size), health)
        super().__init__(model, selection, keep_columns, max_positions=self.backend.max_model_len,
                         max_new_tokens=generation.max_new_tokens)
        self._served = False  # a batch answered since this actor started

    async def __call__(self, batch: dict):
        import asyncio

        n = len(batch["id"])
        out = [self._base_row(batch, i) for i in range(n)]
        items = {i: self.backend.planned_item(_image_size(batch, i), _n_prompt_ids(batch, i))
                 for i in range(n) if out[i]["error"] is None}
        todo = [i for i in items if self._fits(items[i], out[i])]
        self.n_batches += 1
        bid = f"{self.worker}/{self.n_batches}"
        answers = await asyncio.gather(*(self._answer(batch, i) for i in todo), return_exceptions=True)
        for i, a in zip(todo, answers):
            if isinstance(a, BaseException):
                out[i]["error"] = self._refused(a)
                continue
            out[i].update(answer=a.answer, n_prompt_tokens=a.n_prompt_tokens, n_generated_tokens=a.n_generated_tokens,
                          n_visual_tokens_kept=items[i].n_visual, n_visual_tokens_full=self.backend.full_count(
                              _image_size(batch, i)),
                          batch_id=bid, batch_size=len(todo), t_prefill_s=a.t_prefill_s, t_decode_s=a.t_decode_s,
                          t_batch_s=a.t_request_s)
        if not self._served:
            self._served = True
            served(self.health)
        yield self._table(batch, out)

    async def _answer(self, batch, i):
        from PIL import Image

        h, w = _image_size(batch, i)
        image = Image.frombytes("RGB", (w, h), bytes(batch["rgb"][i]))
        ids = np.frombuffer(batch["input_ids"][i], dtype=np.int64).tolist()
        return await self.backend.generate(ids, image)

    def _refused(self, exc: BaseException) -> str:
        """The error text of a request vLLM refused; a dead engine or a cancelled call is
        no row's fault: the process exits (engine gone) or the exception propagates."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            engine_died(self.health, exc)  # Ray restarts this actor and retries its batches on a fresh engine
        if not isinstance(exc, Exception):
            raise exc  # cancellation, KeyboardInterrupt: not a row's fault
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return f"image: vLLM refused the request: {type(exc).__name__}: {first}"


# "module:callable" building the hf engine in place of HiredEngine.load, called with
# (ModelConfig, SelectionConfig, GenerationConfig): a seam for tests and experiments that
# need a fake engine inside the job's Ray actors (they import this module afresh).
ENGINE_FACTORY_ENV = "HIRED_BATCH_ENGINE_FACTORY"


def engine_factory():
    """What builds the hf generation stage's engine: ``HiredEngine.load``, or the callable
    ``ENGINE_FACTORY_ENV`` names."""
    import importlib

    spec = os.environ.get(ENGINE_FACTORY_ENV)
    if not spec:
        from hired_batch.engine.hf import HiredEngine

        return HiredEngine.load
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _arrow_column(values):
    try:
        return pa.array(list(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _unpacked(values, arrow_type) -> pa.Array:
    """A kept column from ``pack_kept``'s pickles, as ``arrow_type`` (the input's)."""
    import pickle

    py = [pickle.loads(bytes(v)) for v in values]
    try:
        return pa.array(py, type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return _arrow_column(py)  # a type Python values cannot rebuild (an extension type): as inferred


def _none_if_empty(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v)


def _max_positions(engine) -> int:
    tc = engine.cfg.text_config
    return int(getattr(tc, "max_position_embeddings", None) or 4096)
