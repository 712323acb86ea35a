"""JSON files the tooling writes (bench rows, score results): strict JSON, NaN as null.

Base layer, beside ``config``: the bench and eval both write through it, and it imports
nothing of the package.
"""

from __future__ import annotations

import json
import math
import pathlib


def json_safe(v):
    """NaN and infinities as None, recursively through dicts and lists: JSON has no NaN
    (an undefined rate, a metric over zero rows) and strict readers refuse it."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def write_json(path, obj, indent: int = 1) -> pathlib.Path:
    """Write ``json_safe(obj)`` to ``path`` (its folder made if missing); return the path."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")
    return out
