"""The options reference, docs/options.md, generated from the same metadata as the ``run``
flags (``options.run_options``), so the two cannot drift (tests/test_options_doc.py).

    python -m hired_batch.job.options_doc > docs/options.md
"""

from __future__ import annotations

import inspect
import sys

from hired_batch.job.options import GROUPS, PARTS, RAY_GROUP, Option, part_class, run_options

COMMAND = "python -m hired_batch.job.options_doc > docs/options.md"

HEADER = f"""# Options reference

<!-- Generated from the config fields' metadata (hired_batch/config.py) by
     {COMMAND}
     Do not edit by hand: tests/test_options_doc.py fails when this file and the code differ. -->

`hired-batch run` and `python jobs/batch_qa.py` (under `ray job submit`) take these flags.
A YAML file given with `--config` takes the same options, keyed by the flag names
without the dashes (`max-new-tokens: 16`; a repeatable option takes a list or one
string); flags given on the command line override it. From Python,
`hired_batch.job.job_from_options` takes them as a dict with underscores
(`max_new_tokens`). A value out of range is refused before Ray starts (one line, exit 2).
"""

# groups whose config class has no docstring worth showing (or no class)
INTROS = {
    PARTS[""]: "Where the rows come from and where the answers go.",
    RAY_GROUP: "With no `--address` and no `RAY_ADDRESS`, `run` starts an embedded local Ray; "
    "under `ray job submit` it joins the cluster it runs on.",
}


def markdown() -> str:
    """The whole reference: a header, then per group an intro and a table."""
    options = run_options()
    sections = [HEADER]
    for group in GROUPS:
        rows = [o for o in options if o.group == group]
        if rows:
            sections.append(f"## {group}\n\n{_intro(group)}\n\n{_table(rows)}")
    return "\n".join(sections)


def _intro(group: str) -> str:
    """The group's intro: INTROS, else the first paragraph of its config class's docstring."""
    if group in INTROS:
        return INTROS[group]
    part = next(p for p, title in PARTS.items() if title == group)
    return " ".join(inspect.getdoc(part_class(part)).split("\n\n")[0].split())


def _table(rows: list[Option]) -> str:
    """flag | default | meaning, with a `SamplingParams` column where the options map to vLLM's."""
    vllm = any("vllm" in o.meta for o in rows)
    head = ["flag", "default"] + (["`SamplingParams`"] if vllm else []) + ["meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in rows:
        cells = [_flag(o), _default(o)] + ([_code(o.meta["vllm"]) if "vllm" in o.meta else ""] if vllm else [])
        lines.append("| " + " | ".join(cells + [_meaning(o)]) + " |")
    return "\n".join(lines) + "\n"


def _flag(o: Option) -> str:
    if o.kind == "negatable":
        return f"`{o.flag}` / `--no-{o.flag[2:]}`"
    return f"`{o.flag}`" + (" (repeatable)" if o.kind == "append" else "")


def _default(o: Option) -> str:
    if o.meta.get("required"):
        return "required"
    if o.default is None:
        return ""
    if o.part is None or "default_text" in o.meta or o.default in ("none", "off"):
        return _escape(o.default)  # words, not a value
    return _code(o.default)


def _meaning(o: Option) -> str:
    """The help, the choices, the longer ``doc`` and one note per engine."""
    text = _escape(o.help)
    if "choices" in o.meta:
        text += "; one of " + ", ".join(_code(c) for c in o.meta["choices"])
    sentences = [text]
    if "doc" in o.meta:
        sentences.append(o.meta["doc"].replace("|", "\\|"))  # doc is written as Markdown already
    if "engine" in o.meta:
        sentences.append(f"read by `--engine {o.meta['engine']}` only")
    for engine, note in o.meta.get("engine_notes", {}).items():
        sentences.append(f"with `--engine {engine}`: {_escape(note)}")
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def _code(text: str) -> str:
    return f"`{text}`" if text and not text.startswith("(") else _escape(text)


def _escape(text: str) -> str:
    """Plain text safe in a table cell: no column breaks, no stray emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*")


if __name__ == "__main__":
    sys.stdout.write(markdown())
