"""Prompt templates: ``str.format`` syntax, parsed and rendered by one ``string.Formatter``.

A template is literal text with ``{name}`` fields; literal braces are written ``{{``
and ``}}``. ``template_fields`` (validation) and ``render_template`` (rendering) go
through the same parser, so a template that passes the check cannot fail, or render
differently, when the rows arrive. Fields are plain names: no positional ``{}``, no
``{name.attr}`` / ``{name[0]}``, no ``!r`` conversion or ``:spec`` (a spec that does not
fit a value would fail per row, after the job has started).

This module does not know which fields a template may use: its callers say so
(``ColumnSpec.check`` for ``--prompt``, ``TaskPreset`` for the benchmark presets).
"""

from __future__ import annotations

import string
from typing import Mapping

from hired_batch.config import ConfigError

_FORMATTER = string.Formatter()  # the one parser: validation and rendering share it

BRACES_HINT = "write literal braces as {{ and }}"  # said wherever a template is refused


def template_names(template: str, what: str = "template") -> tuple[str, ...]:
    """Field names of ``template`` in order of first use; ValueError on bad syntax
    (a lone brace, a positional ``{}``). Conversions and specs are not checked here.

    ``what`` names the template in messages (e.g. ``"--prompt"``).
    """
    return tuple(dict.fromkeys(name for name, _, _ in _parse(template, what)))


def template_fields(template: str, what: str = "template", allowed=None) -> tuple[str, ...]:
    """``template_names``, refusing fields outside ``allowed`` (when given) and any
    conversion or format spec: a template that passes renders for every row."""
    names = template_names(template, what)
    unknown = [f for f in names if allowed is not None and f not in allowed]
    if unknown:
        shown = ", ".join("{" + f + "}" for f in unknown)
        known = ", ".join("{" + f + "}" for f in allowed) or "none"
        raise ConfigError(f"{what} {template!r} has unknown field(s) {shown}; allowed fields: {known}; {BRACES_HINT}")
    for name, spec, conversion in _parse(template, what):
        if spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"{what} {template!r}: field {{{shown}}} takes no conversion or format spec; "
                f"write {{{name}}}, or {BRACES_HINT}"
            )
    return names


def _parse(template: str, what: str) -> list[tuple[str, str, str | None]]:
    """(name, format spec, conversion) of each field, through the shared parser."""
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as e:  # a lone { or }
        raise ConfigError(f"{what} {template!r} is not a valid template ({e}); {BRACES_HINT}") from None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
    for name, _, _ in fields:
        if name == "" or name.isdigit():
            raise ConfigError(
                f"{what} {template!r} has a positional field {{{name}}}; fields need a name, or {BRACES_HINT}"
            )
    return fields


def render_template(template: str, values: Mapping[str, str]) -> str:
    """``template`` with its fields filled from ``values`` and ``{{ }}`` turned into braces."""
    return _FORMATTER.vformat(template, (), values)
