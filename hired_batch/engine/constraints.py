"""Constrained answers (``--json-schema``, ``--choice``, ``--regex``): one meaning on both engines.

A question has at most one constraint (``of``). Both engines run it through xgrammar,
vLLM 0.32's own structured-output backend, compiled the way vLLM compiles it: a schema
with ``compile_json_schema`` (no free whitespace, ``JSON_SEPARATORS``: vLLM's ``disable_any_whitespace``), labels as vLLM's
``choice_as_grammar`` EBNF, a regex with ``compile_regex``. The vLLM engine passes the
constraint on (``vllm_kwargs`` -> ``StructuredOutputsParams``, backend ``VLLM_BACKEND``);
the HF engine masks stock ``generate``'s logits with xgrammar's matcher
(``GrammarProcessor``), so a constraint cannot mean one thing on one engine and another
on the other.

The rules (``check_options``; each refusal is a ``ConfigError``, one line, before Ray):

- a schema that is not JSON, that xgrammar cannot compile, or that uses a keyword xgrammar
  ignores (vLLM's backend refuses those too: the answer would not be valid);
  an empty, blank or repeated label; a regex xgrammar cannot compile;
- a constraint with ``--stop`` (the stop string would cut the grammar's answer) or with
  ``min_new_tokens`` (it would forbid the end the grammar asks for);
- a ``--task`` preset with a constraint unless ``--constrain-task`` (the paper's scores
  are measured unconstrained), and ``--constrain-task`` without a constraint.

An answer the token limit cuts before the grammar is complete is an error row
(``cut_error``), on both engines: the engine stopped without its end token.
No Ray here; xgrammar and torch only where a grammar is compiled or applied.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from functools import lru_cache

from hired_batch.config import ConfigError, GenerationConfig

VLLM_BACKEND = "xgrammar"  # vLLM's StructuredOutputsConfig.backend: the grammar engine of both engines
# JSON without free whitespace (vLLM's disable_any_whitespace; separators "," and ":"): with
# any whitespace allowed a model can pad an answer with blanks until the token limit cuts
# it (random weights always do); compact JSON also costs fewer tokens. Both engines.
JSON_SEPARATORS = (",", ":")
KINDS = ("json", "choice", "regex")  # StructuredOutputsParams field of each kind
FIELDS = ("json_schema", "choices", "regex")  # the GenerationConfig fields that set one (per row too)
FLAGS = {"json": "--json-schema", "choice": "--choice", "regex": "--regex"}


@dataclass(frozen=True)
class Constraint:
    """One question's constraint: ``kind`` in KINDS; ``spec`` the schema's JSON text, the
    labels (a tuple) or the pattern."""

    kind: str
    spec: str | tuple


def schema_text(value) -> str:
    """A ``--json-schema`` value as the schema's JSON text (keys kept in their order, the
    order xgrammar writes them): a mapping (YAML, a row's options), inline JSON, or a file
    holding it. ConfigError when it is none of these."""
    if isinstance(value, (dict, bool)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"json_schema: expected a JSON schema, inline or a file, got {value!r}")
    text = value
    if not value.lstrip().startswith("{"):  # a file
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ConfigError(f"json_schema: expected inline JSON or a schema file, got {value!r} (no such file)")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        parsed = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"json_schema: {value[:80]!r} is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"json_schema: expected a JSON object (a schema), got {type(parsed).__name__}")
    return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)


def of(g: GenerationConfig) -> Constraint | None:
    """The constraint ``g`` sets (None: free text), its shape checked: ConfigError on two at
    once, a schema that is not a JSON object or uses a keyword xgrammar ignores, an empty,
    blank or repeated label, an empty regex."""
    g.check()  # at most one of them
    if g.json_schema is not None:
        text = schema_text(g.json_schema)
        ignored = unsupported_keyword(json.loads(text))
        if ignored:
            raise ConfigError(
                f"json_schema: {ignored} is not enforced by xgrammar (vLLM's backend refuses it too); drop it"
            )
        return Constraint("json", text)
    if g.choices:
        labels = tuple(g.choices)
        if not all(isinstance(x, str) and x.strip() for x in labels):
            raise ConfigError(f"choice: labels must be non-empty strings, got {list(labels)}")
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ConfigError(f"choice: each label once, got {repeated} more than once in {list(labels)}")
        return Constraint("choice", labels)
    if g.regex is not None:
        if not isinstance(g.regex, str) or not g.regex or "\x00" in g.regex:
            raise ConfigError(f"regex: expected a non-empty pattern, got {g.regex!r}")
        return Constraint("regex", g.regex)
    return None


def check_row(g: GenerationConfig) -> Constraint | None:
    """``of(g)`` and the options a constraint contradicts in one question's options:
    ``--stop`` (it would cut the constrained answer) and ``min_new_tokens`` (it would
    forbid the end the grammar asks for)."""
    c = of(g)
    if c is None:
        return None
    if g.stop:
        raise ConfigError(f"{FLAGS[c.kind]} with --stop: the stop string would cut the constrained answer; drop --stop")
    if g.min_new_tokens:
        raise ConfigError(
            f"{FLAGS[c.kind]} with min_new_tokens {g.min_new_tokens}: it forbids the end the constraint asks for"
        )
    return c


def check_options(g: GenerationConfig, task: str | None = None) -> Constraint | None:
    """The job's options: ``check_row``, and a ``--task`` preset (``task``, its name) takes
    a constraint only with ``--constrain-task``, which means nothing without one."""
    c = check_row(g)
    if c is None and g.constrain_task:
        raise ConfigError("--constrain-task needs a constraint: add --json-schema, --choice or --regex, or drop it")
    if c is not None and task and not g.constrain_task:
        raise ConfigError(
            f"--task {task} with {FLAGS[c.kind]}: the paper's scores are measured unconstrained; "
            "add --constrain-task to constrain the preset's answers anyway"
        )
    return c


def with_row_constraint(given: dict) -> dict:
    """A row's options with its constraint (``FIELDS``) as ``GenerationConfig`` holds it:
    the schema as JSON text, the labels as a tuple; a row that sets one constraint
    replaces the job's (the other two are cleared)."""
    out = dict(given)
    if any(out.get(k) not in (None, (), []) for k in FIELDS):
        out = {"json_schema": None, "choices": (), "regex": None, **out}
    if out.get("json_schema") is not None:
        out["json_schema"] = schema_text(out["json_schema"])
    if "choices" in out:
        out["choices"] = (out["choices"],) if isinstance(out["choices"], str) else tuple(out["choices"] or ())
    return out


def vllm_kwargs(c: Constraint) -> dict:
    """``StructuredOutputsParams(**kw)`` for a constraint (vLLM compiles it with ``VLLM_BACKEND``)."""
    return {"json": c.spec} if c.kind == "json" else {c.kind: list(c.spec) if c.kind == "choice" else c.spec}


def choice_grammar(labels) -> str:
    """The labels as one EBNF rule, escaped as vLLM 0.32's ``choice_as_grammar`` escapes them."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def esc(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(esc(ch) for ch in x) + '"' for x in labels)


def cut_error(max_new_tokens: int) -> str:
    """The error of a row the token limit cut before its constraint was complete."""
    return (
        f"answer: cut at max_new_tokens ({max_new_tokens}) before the constraint was complete; raise --max-new-tokens"
    )


# --------------------------------------------------------------------------- keywords xgrammar ignores

_STRING_FORMATS = {  # what xgrammar 0.2.8 enforces (vLLM's STRING_SUPPORTED_FORMATS)
    "email",
    "date",
    "time",
    "date-time",
    "duration",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
}


def unsupported_keyword(schema) -> str | None:
    """The first keyword (as words) of ``schema`` that xgrammar 0.2.8 would not enforce, the
    cases vLLM 0.32's ``has_xgrammar_unsupported_json_features`` refuses; None if none."""
    if isinstance(schema, list):
        return next((k for k in map(unsupported_keyword, schema) if k), None)
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    types = {t} if isinstance(t, str) else set(x for x in t if isinstance(x, str)) if isinstance(t, list) else set()
    bounds = ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema)
    found = (
        (types & {"integer", "number"} and "multipleOf" in schema and "multipleOf")
        or (
            "array" in types
            and next((k for k in ("uniqueItems", "contains", "minContains", "maxContains") if k in schema), None)
        )
        or (
            "string" in types
            and "format" in schema
            and schema["format"] not in _STRING_FORMATS
            and f"format {schema['format']!r}"
        )
        or ("string" in types and bounds and "a length bound with pattern/format")
        or ("object" in types and "propertyNames" in schema and "propertyNames")
        or (
            "object" in types
            and isinstance(schema.get("patternProperties"), dict)
            and "properties" in schema
            and "patternProperties with properties"
        )
        or (isinstance(schema.get("allOf"), list) and len(schema["allOf"]) >= 2 and "allOf with several branches")
    )
    return found or next((k for k in map(unsupported_keyword, schema.values()) if k), None)


# --------------------------------------------------------------------------- compiling (xgrammar)


class Grammars:
    """xgrammar's compiler for one tokenizer, compiled grammars cached by constraint.

    ``vocab_size``: the width of the model's logits (may exceed the tokenizer's vocabulary);
    ``stop_ids``: the ids that end an answer (the engine's EOS ids, as vLLM's ``all_stop_token_ids``)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids=()):
        import xgrammar as xgr

        self.vocab_size = int(vocab_size)
        self.stop_ids = sorted(set(int(i) for i in stop_ids)) or None
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        self._compiled = lru_cache(maxsize=64)(self._compile)

    def compile(self, c: Constraint):
        """The compiled grammar of ``c``; ConfigError (one line) when xgrammar refuses it."""
        return self._compiled(c)

    def _compile(self, c: Constraint):
        try:
            if c.kind == "json":
                return self.compiler.compile_json_schema(c.spec, any_whitespace=False, separators=JSON_SEPARATORS)
            if c.kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(c.spec))
            return self.compiler.compile_regex(c.spec)
        except (RuntimeError, ValueError) as e:
            what = FLAGS[c.kind]
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{what}: xgrammar cannot compile {str(c.spec)[:80]!r}: {first}") from None

    def processor(self, c: Constraint, batch: int) -> "GrammarProcessor":
        """A ``generate`` logits processor holding one matcher per row of a batch."""
        return GrammarProcessor(self.compile(c), batch, self.vocab_size, self.stop_ids)


def grammars_for(tokenizer, vocab_size: int, stop_ids=()) -> Grammars:
    """``Grammars`` for a tokenizer, built once per tokenizer object (the compiler reads the vocabulary)."""
    key = (id(tokenizer), int(vocab_size), tuple(sorted(stop_ids)))
    if key not in _GRAMMARS:
        _GRAMMARS[key] = Grammars(tokenizer, vocab_size, stop_ids)
    return _GRAMMARS[key]


_GRAMMARS: dict = {}


def check_compiles(model_path: str, g: GenerationConfig, task: str | None = None) -> Constraint | None:
    """``check_options`` and, for a constraint, compile it against the model's tokenizer
    (what the check before Ray calls: a schema or regex xgrammar refuses is one line there)."""
    c = check_options(g, task)
    if c is None:
        return None
    _grammars_of(model_path).compile(c)
    return c


@functools.lru_cache(maxsize=4)
def _grammars_of(model_path: str) -> Grammars:
    """``Grammars`` of the checkpoint at ``model_path``: its tokenizer and config read once,
    however many constraints (``--ask`` questions) the check before Ray compiles."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None) or len(tok)
    return grammars_for(tok, max(int(vocab), len(tok)))


class GrammarProcessor:
    """xgrammar's matcher as a ``generate`` logits processor, one matcher per row.

    Each step it feeds every running row's last token to its matcher, then masks the
    logits of the rows still running to the tokens the grammar allows next (its end token
    only once the grammar is complete), as vLLM's structured output does before sampling.
    A row whose matcher has ended (it took the end token) is left alone: ``generate``
    pads it. ``complete(answers)``: per row, the grammar ended (the answer is whole)."""

    def __init__(self, compiled, batch: int, vocab_size: int, stop_ids=None):
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids) for _ in range(batch)]
        self.bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
        self._n = 0  # answer tokens already fed

    def complete(self, answers) -> list[bool]:
        """Per row, whether its grammar ended: ``answers`` (B, T) the ids ``generate``
        returned, whose last steps no processor call saw (it stops at the last end token)."""
        for m, tokens in zip(self.matchers, answers[:, self._n :].tolist()):
            for t in tokens:
                if m.is_terminated() or not m.accept_token(int(t)):
                    break
        return [m.is_terminated() for m in self.matchers]

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self._n:  # generate runs on embeddings: input_ids are the answer so far
            for m, t in zip(self.matchers, input_ids[:, -1].tolist()):
                if not m.is_terminated() and not m.accept_token(int(t)):
                    raise RuntimeError(f"xgrammar refused token {t} that its own mask allowed")
            self._n = input_ids.shape[1]
        running = [b for b, m in enumerate(self.matchers) if not m.is_terminated()]
        for b in running:
            self.matchers[b].fill_next_token_bitmask(self.bitmask, b)
        if running:  # xgrammar's own kernel (CPU or GPU), as vLLM applies it
            self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), indices=running)
        return scores
