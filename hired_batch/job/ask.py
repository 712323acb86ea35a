"""Many questions per image: ``--ask NAME=QUESTION`` (repeatable; in YAML a mapping whose
entries may carry their own generation options) and a list<string> question column.

Every input row still gives one output row. The preprocessing stage decodes and
preprocesses the image once and tokenizes each question (the ``QUESTION_HANDOFF``
columns); the generation stage sends the row's questions to the engine as sub-rows
that share the image (``SHARE``), so the engine runs the vision tower and prunes once
per image and prefills the shared prefix once (HF: one KV cache continued per question;
vLLM: its prefix cache and encoder cache, keyed by the image and the HiRED options).
The answers come back as one column per name (``answer_<name>``,
``n_prompt_tokens_<name>``, ``n_generated_tokens_<name>``), or, for a list column,
lists aligned with the questions (``answers``, ``n_prompt_tokens_each``,
``n_generated_tokens_each``). A question that fails (too long, refused) is named in the
row's ``error`` and leaves the others' answers; a bad image is one error row.

This module holds the rules of the feature (parsing, names, columns, merging); the
stages call it. No Ray, no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow as pa

from hired_batch.config import ConfigError
from hired_batch.engine.backends import SHARE  # noqa: F401 - a sub-row's key naming its image (its row's index)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # a name becomes part of a column name
RESERVED_PREFIX = "struct_"  # answer_struct_<name> is a schema question's typed column
QUESTION_KEY = "question"  # the one key of a YAML entry that is not a generation option
# Handoff columns of the preprocessing stage in many-question mode: each question's
# prompt ids (int64 bytes; b"" when it failed) and its preprocessing error (null when ok).
QUESTION_HANDOFF = {"question_ids": pa.list_(pa.binary()), "question_errors": pa.list_(pa.string())}
LIST_ANSWERS = "answers"  # the output column of a list<string> question column


@dataclass(frozen=True)
class Ask:
    """One named question asked of every image."""

    name: str  # identifier-like; the output's answer_<name> column
    question: str  # its text, rendered like a question column's (``--prompt`` applies)
    options: str | None = None  # its own generation options as canonical JSON (``generation_rules.row_generation``)

    @property
    def overrides(self) -> dict | None:
        return json.loads(self.options) if self.options else None


def parse_asks(value) -> tuple:
    """``--ask`` values -> a tuple of ``Ask``: flag strings ``NAME=QUESTION``, a mapping
    ``{name: question | {question: ..., <generation option>: ...}}`` (YAML, Python), or
    ``Ask`` values. ConfigError (one line) on a bad name, a repeated name, an empty question."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        asks = [_from_entry(name, entry) for name, entry in value.items()]
    elif isinstance(value, (list, tuple)):
        asks = [v if isinstance(v, Ask) else _from_flag(v) for v in value]
    else:
        raise ConfigError(f"--ask expects NAME=QUESTION or a mapping of names to questions, got {value!r}")
    if not asks:
        raise ConfigError("--ask expects at least one NAME=QUESTION, got none")
    seen = set()
    for a in asks:
        _check_name(a.name)
        if a.name in seen:
            raise ConfigError(f"--ask names must be unique, got {a.name!r} twice")
        seen.add(a.name)
        if not a.question.strip():
            raise ConfigError(f"--ask {a.name}: expected a question, got an empty one")
    return tuple(asks)


def _from_flag(text) -> Ask:
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"--ask expects NAME=QUESTION (e.g. place='Indoor or outdoor?'), got {text!r}")
    name, _, question = text.partition("=")
    return Ask(name.strip(), question)


def _from_entry(name, entry) -> Ask:
    if isinstance(entry, str):
        return Ask(str(name), entry)
    if not isinstance(entry, dict) or not isinstance(entry.get(QUESTION_KEY), str):
        raise ConfigError(
            f"ask: {name!r} expects a question, or a mapping with a {QUESTION_KEY!r} and generation "
            f"options, got {entry!r}"
        )
    options = {_option_key(k): v for k, v in entry.items() if k != QUESTION_KEY}
    return Ask(str(name), entry[QUESTION_KEY], json.dumps(options, sort_keys=True) if options else None)


def _option_key(key) -> str:
    """A question's option as the row options name it: the run flag's spelling taken too,
    as a YAML file's top level writes it (``json-schema``, ``choice``, ``max-new-tokens``)."""
    import dataclasses

    from hired_batch.config import GenerationConfig

    key = str(key).replace("-", "_")
    fields = {f.metadata.get("flag", f.name): f.name for f in dataclasses.fields(GenerationConfig)}
    return fields.get(key, key)


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise ConfigError(f"--ask name must be a letter or _ then letters, digits or _, got {name!r}")
    if name.startswith(RESERVED_PREFIX):
        raise ConfigError(
            f"--ask name must not start with {RESERVED_PREFIX!r} (answer_struct_* is reserved), got {name!r}"
        )


def check_options(asks: tuple, generation) -> None:
    """Each question's own options applied to the job's ``generation`` (the rule the
    engines run: ``generation_rules.row_generation``); ConfigError naming the question."""
    from hired_batch.engine.generation_rules import row_generation

    for a in asks:
        try:
            row_generation(generation, a.overrides)
        except ConfigError as e:
            raise ConfigError(f"--ask {a.name}: {e}") from None


def check_columns(c) -> None:
    """Options that contradict ``--ask`` (``c``: the ColumnSpec options as given, a dict;
    ``task``: the preset's name or None). ConfigError naming both."""
    q = c.get("question_column")
    if q is not None and str(q).lower() != "none":
        raise ConfigError(
            f"--ask gives every image its questions, so --question-column {q} would be ignored; "
            "drop one of them (a list<string> question column asks a row's own questions)"
        )
    if c.get("task"):
        raise ConfigError(
            f"--ask cannot be combined with --task {c['task']}: a preset asks its own question and scores one answer"
        )


def merged_options(row_sampling, ask: Ask | None):
    """A sub-row's generation options: the row's ``sampling`` (JSON or None) with the
    question's own on top; None when neither sets any."""
    row = json.loads(row_sampling) if isinstance(row_sampling, (str, bytes)) and row_sampling else {}
    own = ask.overrides if ask else None
    merged = {**(row if isinstance(row, dict) else {}), **(own or {})}
    return merged or None


def struct_types(asks: tuple, generation) -> dict:
    """{name: Arrow type} of the ``--ask`` questions whose answer is JSON of a schema we can
    type (``job.answer_struct``): the question's own ``json_schema``, else the job's when the
    question sets no constraint of its own (the rule ``row_generation`` applies)."""
    from hired_batch.engine.generation_rules import row_generation
    from hired_batch.job import answer_struct

    out = {}
    for a in asks:
        g = row_generation(generation, a.overrides) or generation
        t = answer_struct.arrow_type(g.json_schema) if g.json_schema else None
        if t is not None:
            out[a.name] = t
    return out


def output_types(asks: tuple, list_mode: bool, structs: dict | None = None) -> dict:
    """The many-question output columns beyond ``stages.OUTPUT_FIELDS``, with their Arrow
    types; ``structs``: ``struct_types``, each adding ``answer_struct_<name>``."""
    if list_mode:
        return {
            LIST_ANSWERS: pa.list_(pa.string()),
            "n_prompt_tokens_each": pa.list_(pa.int64()),
            "n_generated_tokens_each": pa.list_(pa.int64()),
        }
    out = {}
    for a in asks:
        out.update(
            {
                f"answer_{a.name}": pa.string(),
                f"n_prompt_tokens_{a.name}": pa.int64(),
                f"n_generated_tokens_{a.name}": pa.int64(),
            }
        )
        if a.name in (structs or {}):
            out[f"answer_{RESERVED_PREFIX}{a.name}"] = structs[a.name]
    return out


def merge(row: dict, names: list, results: list, list_mode: bool, structs: dict | None = None) -> None:
    """Fill one output ``row`` from its questions' ``results`` (one dict per question, in
    order: the engine's output columns, or ``error``). The row keeps the image's columns
    (visual tokens, timings, batch) from its first answered question; ``n_prompt_tokens``
    and ``n_generated_tokens`` sum the answered ones; ``answer`` stays null. Failed
    questions are named in ``error``; when none was answered the row is an error row."""
    ok = [r for r in results if r.get("error") is None]
    failed = [f"{n}: {r['error']}" for n, r in zip(names, results) if r.get("error") is not None]
    if ok:
        row.update({k: v for k, v in ok[0].items() if k not in ("answer", "error")})
        row["n_prompt_tokens"] = sum(int(r["n_prompt_tokens"]) for r in ok)
        row["n_generated_tokens"] = sum(int(r["n_generated_tokens"]) for r in ok)
    row["error"] = "; ".join(failed) or None
    field = {n: r if r.get("error") is None else {} for n, r in zip(names, results)}
    if list_mode:
        row[LIST_ANSWERS] = [field[n].get("answer") for n in names]
        row["n_prompt_tokens_each"] = [field[n].get("n_prompt_tokens") for n in names]
        row["n_generated_tokens_each"] = [field[n].get("n_generated_tokens") for n in names]
        return
    for n in names:
        row[f"answer_{n}"] = field[n].get("answer")
        row[f"n_prompt_tokens_{n}"] = field[n].get("n_prompt_tokens")
        row[f"n_generated_tokens_{n}"] = field[n].get("n_generated_tokens")
        if n in (structs or {}):  # the answer typed from its schema; null when it failed
            from hired_batch.job import answer_struct

            row[f"answer_{RESERVED_PREFIX}{n}"] = answer_struct.parse(field[n].get("answer"), structs[n])


def names(c, n: int) -> list[str]:
    """The names of a row's ``n`` questions as errors and columns give them (``c``: the ColumnSpec)."""
    return [a.name for a in c.ask] if c.ask else [f"question {j}" for j in range(n)]


def is_question_list(arrow_type) -> bool:
    """A question column of this Arrow type holds a list of questions per row."""
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def row_questions(raw) -> tuple[list | None, str | None]:
    """A list column's value -> (its questions, None) or (None, the row's error)."""
    if raw is None:
        return None, "question: missing (null list)"
    items = list(raw)
    if not items:
        return None, "question: empty list (no question to ask)"
    return items, None
