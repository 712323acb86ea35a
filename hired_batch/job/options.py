"""Options (the ``run`` flags, a YAML ``--config``, a dict in Python) -> a checked ``JobConfig``.

An option's name is its flag's (``--max-new-tokens`` -> ``max_new_tokens``). Each
option sets one field of ``JobConfig`` or of one of its parts: the fields declared with
``config.option(...)``, whose metadata holds the help text, the flag name where it differs
and the rest (``field_options`` reads it). The expected type is the field's annotation,
the default the field's default. A few options are not one field (``OTHER_OPTIONS``):
``task`` (a preset's columns, prompt and answer length), ``num_actors`` (both actor
bounds), ``config`` (the YAML file) and the Ray ones.

Adding an option: a field declared with ``option(default, help=...)`` in ``config.py``.
Its flag (``runner.add_run_arguments``), its key here and its row in docs/options.md
(``python -m hired_batch.job.options_doc > docs/options.md``) follow from it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from hired_batch.config import ColumnSpec, ConfigError, JobConfig, Resources, S3Options
from hired_batch.engine.constraints import check_options, schema_text

# JobConfig part ("" = JobConfig itself) -> the group its options are listed under, in this order
PARTS = {
    "": "input and output",
    "columns": "columns",
    "limits": "input limits",
    "s3": "S3",
    "model": "model",
    "selection": "token selection (HiRED)",
    "generation": "generation",
    "resources": "resources",
    "failures": "failures",
}
RAY_GROUP = "Ray"  # the options of the Ray this process joins or starts, not of the job
GROUPS = (*PARTS.values(), RAY_GROUP)  # the order of the groups in --help and the reference
NO_QUESTION = "none"  # --question-column none: the prompt alone is the question


@dataclass(frozen=True)
class Option:
    """One ``run`` option as the flags and the reference show it."""

    name: str  # the flag without dashes, "_" for "-"; the YAML / job_from_options key
    group: str  # one of GROUPS
    help: str  # a short phrase
    kind: str = "value"  # value | append (repeatable) | switch (store_true) | negatable (--no-FLAG too)
    type: type | None = None  # int or float; None: text (parsed later, e.g. "24GB", "auto")
    default: str | None = None  # the default in words; None: not shown
    part: str | None = None  # the JobConfig part whose field it sets ("" = JobConfig); None: not one field
    field: str | None = None  # that field's name
    hint: Any = None  # that field's type annotation
    meta: Mapping = dataclasses.field(default_factory=dict)  # the field's metadata (see config.option)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def help_line(self) -> str:
        """The ``--help`` text: the phrase, the engine notes, the default."""
        only = self.meta.get("engine")
        text = f"--engine {only}: {self.help}" if only else self.help
        if self.kind == "append":
            text += "; repeatable"
        for engine, note in self.meta.get("engine_notes", {}).items():
            text += f"; --engine {engine}: {note}"
        if self.meta.get("required"):
            return text + " (required)"
        return text if self.default is None else f"{text} (default {self.default})"


# Options that are not one field (hand-written; everything else comes from config.py).
OTHER_OPTIONS = (
    Option(
        "config",
        PARTS[""],
        "YAML file with any of these options, keyed by the flag names (max-new-tokens: 16); flags override it",
    ),
    Option(
        "task",
        PARTS["columns"],
        "benchmark preset (see `hired-batch score`): sets columns, prompt and --max-new-tokens",
    ),
    Option("num_actors", PARTS["resources"], "GPU actors (sets --min-actors and --max-actors)", type=int),
    Option("address", RAY_GROUP, "Ray address to join", default="RAY_ADDRESS, else an embedded local Ray"),
    Option("num_cpus", RAY_GROUP, "embedded Ray only: CPUs to declare", type=int),
    Option("num_gpus", RAY_GROUP, "embedded Ray only: GPUs to declare", type=int),
)
SPECIAL_OPTIONS = ("task", "num_actors")  # job options that set more than one field (see the module doc)


def describe_default(value) -> str:
    """A field's default as the help and the reference write it."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)  # floats keep their point (1.0), so the type shows


def _option_of(part: str, f: dataclasses.Field, hint) -> Option:
    """The option a field declared with ``config.option`` is."""
    meta = f.metadata
    allowed = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if bool in allowed:
        kind = "negatable" if meta.get("negatable") else "switch"
    else:
        kind = "append" if tuple in allowed else "value"
    numeric = [t for t in allowed if t in (int, float)]
    return Option(
        name=meta.get("flag", f.name),
        group=PARTS[part],
        help=meta["help"],
        kind=kind,
        type=numeric[0] if len(allowed) == 1 and numeric else None,
        default=meta.get("default_text", describe_default(f.default)),
        part=part,
        field=f.name,
        hint=hint,
        meta=meta,
    )


def part_class(part: str) -> type:
    """The dataclass of one JobConfig part ("" = JobConfig)."""
    return type(getattr(JobConfig(), part)) if part else JobConfig


def field_options() -> tuple[Option, ...]:
    """Every option that sets one field, from the config fields' metadata, by PARTS order."""
    found = []
    for part in PARTS:
        cls = part_class(part)
        hints = typing.get_type_hints(cls)
        found += [_option_of(part, f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]
    return tuple(found)


def run_options() -> tuple[Option, ...]:
    """Every ``run`` option, in GROUPS order; in a group the hand-written ones first."""
    every = OTHER_OPTIONS + field_options()
    return tuple(o for group in GROUPS for o in every if o.group == group)


def known_options() -> tuple[str, ...]:
    """Every option ``job_from_options`` takes."""
    return tuple(o.name for o in field_options()) + SPECIAL_OPTIONS


def job_from_options(options: Mapping[str, Any]) -> JobConfig:
    """A checked JobConfig from options named like the ``run`` flags (underscores).

    Values have the type of the field they set (an int is taken for a float; a string or a
    list for ``input``/``keep_column``; ``batch_size`` is an int or "auto"); an option
    left out (or None) keeps the field's default, or the ``task`` preset's. ConfigError
    names the option, what was expected and what was found: an unknown option, a wrong
    type, a value out of range, a missing ``input``/``output``.
    """
    fields = field_options()
    known = tuple(o.name for o in fields) + SPECIAL_OPTIONS
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known options: {', '.join(sorted(known))}")
    o = {k: v for k, v in options.items() if v is not None}
    task = _task(o.get("task"))
    values = {part: {} for part in PARTS}
    for opt in fields:
        if opt.name in o:
            values[opt.part][opt.field] = _typed(opt.name, o[opt.name], opt.hint)
    required = [opt for opt in fields if opt.meta.get("required")]
    if not all(values[opt.part].get(opt.field) for opt in required):
        raise ConfigError(f"{' and '.join(opt.flag for opt in required)} are required")
    job = JobConfig(**values.pop(""))
    defaults = {part: getattr(job, part) for part in values}
    if task:
        defaults["generation"] = dataclasses.replace(job.generation, max_new_tokens=task.max_new_tokens)
    values["resources"] = _actor_bounds(values["resources"], o.get("num_actors"))
    columns = _columns(values.pop("columns"), o, task)
    job = dataclasses.replace(job, columns=columns, **{p: _part(defaults[p], v) for p, v in values.items()})
    if columns.ask:  # each question's own options, checked against the job's (job/ask.py)
        from hired_batch.job import ask

        ask.check_options(columns.ask, job.generation)
    check_options(job.generation, columns.task)  # a constraint and the options it contradicts
    return job


def _part(default, values: dict):
    """``default`` with ``values`` set, checked (parts without ``check`` check themselves on creation)."""
    new = dataclasses.replace(default, **values)
    return new.check() if hasattr(new, "check") else new


def _typed(key: str, value, hint):
    """``value`` as the field's type ``hint`` wants it; ConfigError naming the option otherwise."""
    if key == "batch_size":
        from hired_batch.engine.batching import parse_batch_size

        return parse_batch_size(value)  # an int >= 1 or "auto" (a flag gives text)
    if key == "ask":
        from hired_batch.job.ask import parse_asks

        return parse_asks(value)  # NAME=QUESTION strings, or a YAML mapping with per-question options
    if key == "json_schema":
        return schema_text(value)  # a mapping (YAML), inline JSON or a file -> the schema's JSON text
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
    if c.get("ask"):  # the questions come from --ask: a question column or a preset would contradict it
        from hired_batch.job.ask import check_columns

        check_columns(dict(c, task=task.name if task else None))
        c["question_column"] = NO_QUESTION
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
