"""Options (the ``run`` flags, a YAML ``--config``, a dict in Python) -> a checked ``JobConfig``.

An option's name is its flag's (``--max-new-tokens`` -> ``max_new_tokens``). Each
option sets one field of ``JobConfig`` or of one of its parts (``OPTION_FIELDS``), and
its expected type is that field's annotation; its default is the field's default,
written once in ``hired_batch.config``. A few options do more than set one field
(``SPECIAL_OPTIONS``): ``task`` (a preset's columns, prompt and answer length) and
``num_actors`` (both actor bounds).

Adding an option: a field (with its default and comment) in ``config.py``, its name in
``OPTION_FIELDS`` here, its flag in ``runner.add_run_arguments`` (help reads the default
from the field).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from hired_batch.config import ColumnSpec, ConfigError, GenerationConfig, JobConfig, Resources, S3Options

# JobConfig part ("" = JobConfig itself) -> the options that set its fields
OPTION_FIELDS = {
    "": ("input", "output", "checkpoint", "overwrite"),
    "columns": ("id_column", "image_column", "question_column", "prompt", "keep_column"),
    "model": ("model", "engine", "dtype", "vision_chunk", "max_model_len"),
    "selection": ("selector", "mode", "budget", "budget_tokens", "alpha", "save_indices"),
    "generation": ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "system_prompt",
                   "seed"),
    "resources": ("batch_size", "window", "memory_limit", "min_actors", "max_actors", "gpus_per_actor", "tensor_parallel_size",
                  "preprocess_cpus",
                  "generate_cpus", "generate_memory", "preprocess_actors", "rows_per_file"),
    "limits": ("max_pixels", "image_timeout"),
    "s3": ("s3_endpoint",),
    "failures": ("max_failed_fraction", "skip_unreadable"),
}
# options whose field has another name (the flag reads better, or is singular because it repeats)
FIELD_NAMES = {"input": "inputs", "keep_column": "keep_columns", "model": "path", "save_indices": "return_indices",
               "s3_endpoint": "endpoint"}
SPECIAL_OPTIONS = ("task", "num_actors")  # options that set more than one field (see the module doc)
NO_QUESTION = "none"  # --question-column none: the prompt alone is the question


def known_options() -> tuple[str, ...]:
    """Every option ``job_from_options`` takes."""
    return tuple(k for keys in OPTION_FIELDS.values() for k in keys) + SPECIAL_OPTIONS


def job_from_options(options: Mapping[str, Any]) -> JobConfig:
    """A checked JobConfig from options named like the ``run`` flags (underscores).

    Values have the type of the field they set (an int is taken for a float; a string or a
    list for ``input``/``keep_column``; ``batch_size`` is an int or "auto"); an option
    left out (or None) keeps the field's default, or the ``task`` preset's. ConfigError
    names the option, what was expected and what was found: an unknown option, a wrong
    type, a value out of range, a missing ``input``/``output``.
    """
    unknown = sorted(set(options) - set(known_options()))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known options: {', '.join(sorted(known_options()))}")
    o = {k: v for k, v in options.items() if v is not None}
    task = _task(o.get("task"))
    parts = {part: _part_values(part, o) for part in OPTION_FIELDS}
    top = parts.pop("")
    if not top.get("inputs") or not top.get("output"):
        raise ConfigError("--input and --output are required")
    job = JobConfig(**top)
    return dataclasses.replace(
        job, columns=_columns(parts["columns"], o, task), model=_part(job.model, parts["model"]),
        selection=_part(job.selection, parts["selection"]),
        generation=_part(GenerationConfig(max_new_tokens=task.max_new_tokens) if task else job.generation,
                         parts["generation"]),
        resources=_part(job.resources, _actor_bounds(parts["resources"], o.get("num_actors"))),
        limits=dataclasses.replace(job.limits, **parts["limits"]), s3=dataclasses.replace(job.s3, **parts["s3"]),
        failures=_part(job.failures, parts["failures"]))


def _part(default, values: dict):
    """``default`` with ``values`` set, checked."""
    return dataclasses.replace(default, **values).check()


def _part_values(part: str, o: dict) -> dict:
    """{field: value} of one JobConfig part, each value checked against the field's type."""
    cls = type(getattr(JobConfig(), part)) if part else JobConfig
    hints = typing.get_type_hints(cls)
    values = {}
    for key in OPTION_FIELDS[part]:
        if key in o:
            name = FIELD_NAMES.get(key, key)
            values[name] = _typed(key, o[key], hints[name])
    return values


def _typed(key: str, value, hint):
    """``value`` as the field's type ``hint`` wants it; ConfigError naming the option otherwise."""
    if key == "batch_size":
        from hired_batch.engine.batching import parse_batch_size

        return parse_batch_size(value)  # an int >= 1 or "auto" (a flag gives text)
    allowed = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if tuple in allowed:  # repeatable options: one string or a list of strings
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(items)
        return _wrong(key, "a string or a list of strings", value)
    for t in allowed:
        if isinstance(value, bool) != (t is bool):
            continue  # True is an int to Python, not to a user
        if isinstance(value, t):
            return value
        if t is float and isinstance(value, int):
            return float(value)
    return _wrong(key, " or ".join(t.__name__ for t in allowed), value)


def _wrong(key: str, expected: str, value):
    raise ConfigError(f"option {key!r} expects {expected}, got {value!r} ({type(value).__name__})")


def _task(name):
    if not name:
        return None
    from hired_batch.job.tasks import get_task

    return get_task(name)


def _columns(given: dict, o: dict, task) -> ColumnSpec:
    """The column mapping: given options, else the task preset's columns, else the defaults.

    A task also keeps its ground-truth columns and, unless ``prompt`` is given, renders
    its own prompt template from the row (``prompt_columns``)."""
    from hired_batch.job.sources import fsspec_options
    from hired_batch.job.stages import check_prompt

    c = dict(given, id_column_given="id_column" in given)
    if task:
        c.setdefault("id_column", task.id_column or ColumnSpec.id_column)
        c.setdefault("image_column", task.image_column)
        c.setdefault("question_column", task.question_column)
    q = c.get("question_column", ColumnSpec.question_column)
    if q is not None and q.lower() == NO_QUESTION:
        c["question_column"] = q = None
    keep = c.get("keep_columns", ()) + (tuple(task.kept_columns) if task else ())
    c["keep_columns"] = tuple(dict.fromkeys(keep))
    if task and "prompt" not in c:
        # the question column (the preset's, or --question-column's) fills the template's question slot
        c.update(task=task.name, prompt_columns=tuple(f for f in task.prompt_fields if f != task.question_column))
    c["storage_options"] = fsspec_options(S3Options(endpoint=o.get("s3_endpoint")))
    return check_prompt(ColumnSpec(**c))


def _actor_bounds(values: dict, num_actors) -> dict:
    """``num_actors`` sets both bounds; a lower bound alone raises the upper one to it."""
    if num_actors is not None:
        n = _typed("num_actors", num_actors, int)
        values = {"min_actors": n, "max_actors": n, **values}
    lo = values.get("min_actors", Resources.min_actors)
    return {"max_actors": max(lo, Resources.max_actors), **values}
