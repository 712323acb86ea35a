"""``answer_struct``: a ``--json-schema`` answer as an Arrow value typed from the schema.

The mapping (``arrow_type``): object -> struct (its ``properties``, in order), string and
a string enum -> string, integer -> int64, number -> float64, boolean -> bool, array ->
list of its ``items``; ``["T", "null"]`` is T (every field is nullable); ``anyOf`` /
``oneOf`` whose branches all map to one type is that type; local ``$ref``s are followed.
Anything else (branches of different types, an object without properties, an array
without items, a recursive schema) cannot be typed: ``arrow_type`` returns None and
``untyped_reason`` says why, and the job keeps only the text column.

``column(texts, type)``: the answers parsed; a null text (an error row), text that is not
JSON, or a value that does not fit the type is null. No Ray, no engine here: the
generation stage calls it per batch, once per schema.
"""

from __future__ import annotations

import json

import pyarrow as pa

COLUMN = "answer_struct"  # the output column of the job's --json-schema

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


class Untyped(ValueError):
    """A schema (or a part of it) with no one Arrow type; the message says where and why."""


def arrow_type(schema) -> pa.DataType | None:
    """The Arrow type of answers valid against ``schema`` (a dict or its JSON text), or None
    when it cannot be typed (``untyped_reason``)."""
    try:
        return _type(_loaded(schema), _loaded(schema), "schema", ())
    except Untyped:
        return None


def untyped_reason(schema) -> str | None:
    """Why ``arrow_type(schema)`` is None (a phrase naming the part), or None when it is typed."""
    try:
        _type(_loaded(schema), _loaded(schema), "schema", ())
    except Untyped as e:
        return str(e)
    return None


def parse(text: str | None, arrow: pa.DataType):
    """One answer as a Python value of type ``arrow`` (for ``pa.array``), or None when the
    text is null, is not JSON or does not fit the type."""
    if text is None:
        return None
    try:
        return _fit(json.loads(text), arrow)
    except (ValueError, TypeError, KeyError):
        return None


def column(texts, arrow: pa.DataType) -> pa.Array:
    """``answer_struct`` of a batch: each text ``parse``d (null for error rows: pass None)."""
    return pa.array([parse(t, arrow) for t in texts], type=arrow)


def _loaded(schema):
    return json.loads(schema) if isinstance(schema, (str, bytes)) else schema


def _type(s, root, where: str, seen: tuple) -> pa.DataType:
    """The Arrow type of sub-schema ``s`` at ``where``; ``seen``: the $refs being followed."""
    if not isinstance(s, dict):
        raise Untyped(f"{where} is not a schema object")
    if "$ref" in s:
        return _type(_ref(s["$ref"], root, where, seen), root, where, (*seen, s["$ref"]))
    for key in ("anyOf", "oneOf"):
        if key in s:
            types = {str(t): t for t in (_type(b, root, f"{where}.{key}", seen) for b in s[key])}
            if len(types) != 1:
                raise Untyped(f"{where}.{key} has branches of different types ({', '.join(types)})")
            return next(iter(types.values()))
    if "enum" in s or "const" in s:
        values = s.get("enum", [s.get("const")])
        kinds = {_kind(v) for v in values}
        if len(kinds) != 1 or None in kinds:
            raise Untyped(f"{where}: enum/const values of different or untyped kinds ({values!r})")
        return _SCALARS[kinds.pop()]
    t = s.get("type", "object" if "properties" in s else "array" if "items" in s else None)
    if isinstance(t, list):
        named = [x for x in t if x != "null"]
        if len(named) != 1:
            raise Untyped(f"{where} has several types {t}")
        t = named[0]
    if t in _SCALARS:
        return _SCALARS[t]
    if t == "object":
        props = s.get("properties")
        if not props:
            raise Untyped(f"{where} is an object without properties (a free-form object)")
        return pa.struct([pa.field(k, _type(v, root, f"{where}.{k}", seen)) for k, v in props.items()])
    if t == "array":
        if not isinstance(s.get("items"), dict):
            raise Untyped(f"{where} is an array without one items schema")
        return pa.list_(_type(s["items"], root, f"{where}[]", seen))
    raise Untyped(f"{where} has no type we map ({t!r})")


def _ref(ref: str, root, where: str, seen: tuple):
    if ref in seen:
        raise Untyped(f"{where} is recursive ({ref})")
    if not ref.startswith("#/"):
        raise Untyped(f"{where}: only local $refs are followed, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            raise Untyped(f"{where}: $ref {ref!r} points nowhere")
        node = node[part]
    return node


def _kind(v) -> str | None:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return "string" if isinstance(v, str) else None


def _fit(v, arrow: pa.DataType):
    """``v`` (parsed JSON) checked against ``arrow``; TypeError when it does not fit."""
    if v is None:
        return None
    if pa.types.is_struct(arrow):
        if not isinstance(v, dict):
            raise TypeError("not an object")
        return {f.name: _fit(v.get(f.name), f.type) for f in arrow}
    if pa.types.is_list(arrow):
        if not isinstance(v, list):
            raise TypeError("not an array")
        return [_fit(x, arrow.value_type) for x in v]
    if pa.types.is_string(arrow) and isinstance(v, str):
        return v
    if pa.types.is_boolean(arrow) and isinstance(v, bool):
        return v
    if pa.types.is_int64(arrow) and isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63:
        return v
    if pa.types.is_float64(arrow) and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"{v!r} is not {arrow}")
