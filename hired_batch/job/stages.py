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

from hired_batch.config import (
    QUESTION_FIELD,
    ColumnSpec,
    ConfigError,
    DecodeLimits,
    GenerationConfig,
    ModelConfig,
    SelectionConfig,
)
from hired_batch.engine import backends
from hired_batch.engine.generation_rules import row_generation
from hired_batch.engine.handoff import item_bytes
from hired_batch.engine.inputs import decode_images, exception_error, validate_question
from hired_batch.engine.prompts import render_template, template_fields, template_names
from hired_batch.job import answer_struct, ask
from hired_batch.job.engine_health import engine_died, served, start_engine


def check_prompt(c: ColumnSpec) -> ColumnSpec:
    """``c.check()``, and ``c.prompt`` parsed as a template: ConfigError on an unknown
    field or a lone brace, or on {question} without a question column; returns ``c``."""
    c.check()
    if c.prompt is not None:
        if c.question_column is None and not c.ask and QUESTION_FIELD in template_names(c.prompt, "--prompt"):
            raise ConfigError(
                f"--prompt {c.prompt!r} uses {{{QUESTION_FIELD}}} but --question-column is none, "
                f"so there is no question to insert; drop {{{QUESTION_FIELD}}} or name the "
                "question column"
            )
        template_fields(c.prompt, "--prompt", allowed=c.prompt_fields_allowed)
    return c


def question_for(
    c: ColumnSpec, raw, limits: DecodeLimits = DecodeLimits(), fields: dict | None = None
) -> tuple[str | None, str | None]:
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
    (``GenerateStage``, given ``keep_columns`` as a schema)."""
    import pickle

    for k in keep_columns:
        values = [pickle.dumps(v) for v in table.column(k).to_pylist()]
        table = table.append_column(f"{KEPT_PREFIX}{k}", pa.array(values, pa.binary()))
    return table


def output_name(column: str) -> str:
    """Name a kept column gets in the output (gt_ prefix only on a clash)."""
    return f"gt_{column}" if column in OUTPUT_FIELDS else column


SAMPLING_FIELD = "sampling"  # a batch column of per-row generation options (``generation_rules.row_generation``)


class PreprocessStage:
    """CPU: decode and validate each row, build what the chosen engine's generation
    stage reads (``backends.handoff_types``: the prompt ids, the image size and the
    backend's own columns, filled by its ``encode``).

    Reads: id, image, question (per ColumnSpec). Loads only the processor.
    ``system_prompt``: ``GenerationConfig.system_prompt``, put before every question.
    """

    def __init__(
        self,
        model_path: str,
        columns: ColumnSpec,
        limits: DecodeLimits = DecodeLimits(),
        system_prompt: str | None = None,
        engine: str = ModelConfig.engine,
    ):
        from hired_batch.engine.weights import Preprocessor
        from hired_batch.job.sources import configure_s3_retries

        configure_s3_retries()  # image URLs on s3:// read with the job's retry policy in this actor
        self.pre = Preprocessor.from_pretrained(model_path, system_prompt)
        self.columns = columns
        self.limits = limits
        self.backend = backends.get(engine)  # the generation engine the rows are prepared for
        self.types = backends.handoff_types(self.backend)  # typed: an all-null column stays a string column
        self.multi = bool(columns.ask) or columns.question_list  # many questions per image (job/ask.py)
        if self.multi:
            self.types = {**self.types, **ask.QUESTION_HANDOFF}

    def __call__(self, batch: dict) -> pa.Table:
        c = self.columns
        n = len(batch[c.id_column])
        rows, failures = [], {}
        images = decode_images(batch[c.image_column], limits=self.limits, storage_options=c.storage_options)
        for i in range(n):
            try:
                rows.append(self._one(batch, i, images[i]))
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's error
                failures[i] = e
                rows.append(dict(self._empty_row(batch, i), error=exception_error("preprocess: ", e)))
        raise_if_systematic(failures, n)
        table = {k: pa.array([r[k] for r in rows], type=t) for k, t in self.types.items()}
        for k in c.keep_columns:  # packed by ``pack_kept`` in the pipeline; as they are when called directly
            packed = f"{KEPT_PREFIX}{k}" in batch
            table[f"{KEPT_PREFIX}{k}"] = (
                pa.array(list(batch[f"{KEPT_PREFIX}{k}"]), pa.binary()) if packed else list(batch[k])
            )
        return pa.table(table)

    def _many(self, batch, i, row, image, img_err, fields, t0, t_image) -> dict:
        """One row's handoff with many questions: the image encoded once (with the first
        question that makes a prompt), every question's prompt ids and error."""
        from hired_batch.engine.weights import PromptError

        c = self.columns
        texts, errors, row["error"] = self._questions(batch, i, fields)
        row["error"] = img_err or row["error"]
        if SAMPLING_FIELD in batch:
            row[SAMPLING_FIELD] = _sampling_json(batch[SAMPLING_FIELD][i])
        if row["error"] is None:
            ids = []
            for j, text in enumerate(texts):
                try:
                    ids.append(b"" if errors[j] else self.pre.prompt_ids(text).tobytes())
                except PromptError as e:  # the question's text holds the image token
                    errors[j] = str(e)
                    ids.append(b"")
            ok = [j for j, e in enumerate(errors) if e is None]
            if ok:
                row.update(self.backend.encode(self.pre, image, texts[ok[0]]))
                row.update(question_ids=ids, question_errors=errors)
            else:  # no question makes a prompt: one error row naming each
                row["error"] = "; ".join(f"{n}: {e}" for n, e in zip(ask.names(c, len(texts)), errors))
        row["t_preprocess_s"] = time.perf_counter() - t0 + t_image
        return row

    def _questions(self, batch, i, fields) -> tuple[list, list, str | None]:
        """(question texts, their errors, the row's error): ``--ask``'s questions or the row's list."""
        from dataclasses import replace

        c = self.columns
        if c.ask:
            raw = [a.question for a in c.ask]
        else:
            raw, err = ask.row_questions(batch[c.question_column][i])
            if err:
                return [], [], err
        as_column = replace(c, question_column=c.question_column or "ask")  # each renders as a column's question
        pairs = [question_for(as_column, q, self.limits, fields) for q in raw]
        return [t for t, _ in pairs], [e for _, e in pairs], None

    def _empty_row(self, batch, i) -> dict:
        row = {k: [] if pa.types.is_list(t) else backends.empty_value(t) for k, t in self.types.items()}
        return dict(row, id=str(batch[self.columns.id_column][i]))

    def _one(self, batch, i, decoded) -> dict:
        """One row's handoff; ``decoded``: its image as ``decode_images`` read it."""
        from hired_batch.engine.weights import PromptError

        t0 = time.perf_counter()
        c = self.columns
        image, img_err, t_image, exc = decoded
        if exc is not None:
            raise exc
        row = self._empty_row(batch, i)
        fields = {k: batch[k][i] for k in c.prompt_columns}
        if self.multi:
            return self._many(batch, i, row, image, img_err, fields, t0, t_image)
        question, err = question_for(c, batch[c.question_column][i] if c.question_column else None, self.limits, fields)
        row["error"] = img_err or err
        if SAMPLING_FIELD in batch:  # the row's own generation options travel with it (JSON or null)
            row[SAMPLING_FIELD] = _sampling_json(batch[SAMPLING_FIELD][i])
        try:
            if row["error"] is None:
                row.update(self.backend.encode(self.pre, image, question))
        except PromptError as e:  # the question's text holds the image token
            row["error"] = str(e)
        row["t_preprocess_s"] = time.perf_counter() - t0 + t_image  # this row's own read and decode
        return row


def raise_if_systematic(failures: dict, n_rows: int) -> None:
    """Re-raise when every one of a batch's ``n_rows`` rows failed with the same exception
    type (``failures``: {row: exception}): a bug or a broken engine, not bad data, and an
    error row for every input would hide it. Otherwise the failed rows stay error rows."""
    if n_rows and len(failures) == n_rows and len({type(e) for e in failures.values()}) == 1:
        raise next(iter(failures.values()))


# Output columns, in order, with their Arrow types (docs/guarantees.md documents each).
OUTPUT_FIELDS = {
    "id": pa.string(),
    "answer": pa.string(),
    "error": pa.string(),
    "model": pa.string(),
    "selector": pa.string(),
    "mode": pa.string(),
    "budget": pa.float64(),
    "n_visual_tokens_full": pa.int64(),
    "n_visual_tokens_kept": pa.int64(),
    "n_prompt_tokens": pa.int64(),
    "n_generated_tokens": pa.int64(),
    "batch_id": pa.string(),
    "batch_size": pa.int64(),
    "t_preprocess_s": pa.float64(),
    "t_vision_s": pa.float64(),
    "t_prefill_s": pa.float64(),
    "t_decode_s": pa.float64(),
    "t_batch_s": pa.float64(),
    "worker": pa.string(),
    "handoff_bytes": pa.int64(),
}


class GenerateStage:
    """Generation actor on any backend (``--engine``, ``backends.get``): one engine per
    actor, loaded once.

    Reads the backend's handoff columns and the keep__* columns. Rows whose prompt the
    context cannot hold become error rows; the rest go to the backend's runner in one
    ``generate`` per Ray batch (the HF runner groups them, halving a batch that runs out
    of memory; vLLM's submits one request per row). What a row raised alone is that
    row's error, unless all did alike (``raise_if_systematic``).

    ``__call__`` is a coroutine (an async generator): Ray Data runs up to the backend's
    ``batches_in_flight`` calls at once in each actor, so an engine that batches
    continuously (vLLM) always has rows of several Ray batches to run together.

    A runner that raises ``backends.EngineDead`` ends the actor's process, so Ray
    restarts the actor and retries its batches, unless it died of the same error last
    time (``engine_health``: then the job ends).
    """

    def __init__(
        self,
        model: ModelConfig,
        selection: SelectionConfig,
        generation: GenerationConfig,
        keep_columns: tuple = (),
        engine=None,
        batch_size: int | str | None = None,
        memory_limit: str | None = None,
        tensor_parallel_size: int = 1,
        health=None,
        asks: tuple = (),
        question_list: bool = False,
    ):
        # engine: an already loaded engine for the backend (tests); health: the job's
        # engine_health.FailureLog actor (None without Ray): bounds restarts
        backend = backends.get(model.engine)
        self.health = health
        self.runner = start_engine(
            lambda: backend.start(
                model,
                selection,
                generation,
                batch_size=batch_size,
                memory_limit=memory_limit,
                tensor_parallel_size=tensor_parallel_size,
                engine=engine,
            ),
            health,
        )
        self.model_name = model.path
        self.selection = selection
        self.generation = generation  # the job's options; a row's ``sampling`` overrides some
        # --json-schema: the answer_struct column's type (None: no schema, or one we cannot type)
        self.struct_type = answer_struct.arrow_type(generation.json_schema) if generation.json_schema else None
        # names, or a schema of them (rows packed by ``pack_kept``: rebuilt with these types)
        self.keep_schema = keep_columns if isinstance(keep_columns, pa.Schema) else None
        self.keep_columns = tuple(keep_columns.names if self.keep_schema is not None else keep_columns)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # many questions per image (job/ask.py): --ask's questions, or a list<string> question column
        self.asks, self.question_list = tuple(asks), bool(question_list)
        self.structs = ask.struct_types(self.asks, generation)  # answer_struct_<name> types
        self.extra_fields = (
            ask.output_types(self.asks, self.question_list, self.structs) if self.asks or question_list else {}
        )
        self._served = False  # a batch answered since this actor started

    async def __call__(self, batch: dict):
        yield await self.answer(batch)

    def table(self, batch: dict) -> pa.Table:
        """``__call__`` outside Ray: the output table of one batch."""
        import asyncio

        return asyncio.run(self.answer(batch))

    async def answer(self, batch: dict) -> pa.Table:
        """The output table of one Ray batch of handoff rows."""
        n = len(batch["id"])
        out = [self._base_row(batch, i) for i in range(n)]
        rows = {}  # row i (or (i, question j)) -> what the runner gets
        many = {}  # row i -> its questions' results, in order (many-question mode)
        for i in range(n):
            if out[i]["error"] is None:
                row = {k: batch[k][i] for k in batch if not k.startswith(KEPT_PREFIX) and k not in ask.QUESTION_HANDOFF}
                if not self.extra_fields:
                    if self._ready(row, out[i], _none_if_empty(row.get("sampling"))):
                        rows[i] = row
                    continue
                many[i] = self._questions(batch, i, row, rows)
        try:
            results = await self.runner.generate(list(rows.values()))
        except backends.EngineDead as e:
            engine_died(self.health, e.__cause__ or e)  # Ray restarts this actor and retries its batches
            raise
        failures = {}  # row -> what it raised alone
        for key, r in zip(rows, results):
            if "exception" in r:
                failures[key] = r.pop("exception")
            call = r.pop("call", None)
            if call is not None:
                r["batch_id"] = f"{self.worker}/{call}"
            if isinstance(key, tuple):  # one question of row key[0]
                many[key[0]][key[1]] = r
            else:
                out[key].update(r)
        raise_if_systematic(failures, len(rows))
        for i, results in many.items():
            names = [a.name for a in self.asks] if self.asks else [f"question {j}" for j in range(len(results))]
            ask.merge(out[i], names, results, self.question_list, self.structs)
        if not self._served:
            self._served = True
            served(self.health)
        return self._table(batch, out)

    def _ready(self, row: dict, result: dict, sampling) -> bool:
        """Add a handoff ``row``'s planned tokens and generation options; False (with the
        error in ``result``) when its options are bad or its prompt does not fit."""
        row["item"] = self.runner.planned_item((int(row["image_h"]), int(row["image_w"])), _n_ids(row["input_ids"]))
        try:
            row["generation"] = row_generation(self.generation, sampling)
        except ConfigError as e:  # a row's bad options are that row's error
            result["error"] = str(e)
            return False
        return self._fits(row, result)

    def _questions(self, batch, i, row: dict, rows: dict) -> list[dict]:
        """Row ``i``'s questions as sub-rows sharing its image (added to ``rows`` under
        (i, j)); returns a result per question, the error already there for those that failed."""
        results = []
        for j, (ids, err) in enumerate(zip(batch["question_ids"][i], batch["question_errors"][i])):
            results.append({} if err is None else {"error": str(err)})
            if err is None:
                sub = dict(row, input_ids=ids, **{ask.SHARE: i})
                options = ask.merged_options(_none_if_empty(row.get("sampling")), self.asks[j] if self.asks else None)
                if self._ready(sub, results[j], options):
                    rows[(i, j)] = sub
        return results

    def _base_row(self, batch, i) -> dict:
        row = {k: None for k in OUTPUT_FIELDS}
        s = self.selection
        row.update(
            id=str(batch["id"][i]),
            error=_none_if_empty(batch["error"][i]),
            model=self.model_name,
            selector=s.selector,
            mode=s.mode,
            budget=float(s.budget_arg),
            t_preprocess_s=float(batch["t_preprocess_s"][i]),
            worker=self.worker,
            # what this row brought through the object store from the preprocessing stage
            handoff_bytes=item_bytes(batch[k][i] for k in batch),
        )
        return row

    def _fits(self, handoff: dict, row) -> bool:
        """Refuse prompts the model's context cannot hold (visual + text + answer)."""
        g = handoff["generation"]
        n_new = g.max_new_tokens if g else self.runner.max_new_tokens
        row["error"] = context_error(handoff["item"].n_prompt, n_new, self.runner.max_positions)
        return row["error"] is None

    def _table(self, batch, out) -> pa.Table:
        cols = {k: pa.array([r[k] for r in out], type=t) for k, t in OUTPUT_FIELDS.items()}
        for k, t in self.extra_fields.items():  # many questions per image: job/ask.py
            cols[k] = pa.array([r.get(k) for r in out], type=t)
        if self.selection.save_indices:
            cols["kept_indices"] = pa.array([r.get("kept_indices") for r in out], pa.list_(pa.int64()))
        if self.struct_type is not None and not self.extra_fields:  # --json-schema's typed answer; null on errors
            texts = [r["answer"] if r["error"] is None else None for r in out]
            cols[answer_struct.COLUMN] = answer_struct.column(texts, self.struct_type)
        for k in self.keep_columns:
            values = batch[f"{KEPT_PREFIX}{k}"]
            cols[output_name(k)] = (
                _arrow_column(values) if self.keep_schema is None else _unpacked(values, self.keep_schema.field(k).type)
            )
        return pa.table(cols)


def context_error(n_prompt: int, max_new_tokens: int, max_positions: int) -> str | None:
    """The row's error when its prompt (visual + text tokens) and answer do not fit the
    engine's context, else None (the generation stage's check; ``hired-batch plan`` asks it too)."""
    need = n_prompt + max_new_tokens
    if need <= max_positions:
        return None
    return f"question: prompt too long ({need} tokens with image and answer > context {max_positions})"


def _n_ids(input_ids) -> int:
    return len(input_ids) // np.dtype(np.int64).itemsize  # int64 token ids stored as bytes


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


def _sampling_json(v) -> str | None:
    """A row's generation options as the handoff carries them: JSON text, or None."""
    import json

    return json.dumps(v) if isinstance(v, dict) else _none_if_empty(v)
