"""How closely one setting's answers agree with a reference setting's (``full``) on the
same rows, with 95 % Wilson intervals, and the recommendation rule of ``calibrate``.

Three measures, each a share in [0, 1]:

- ``exact``: equal after the VQA answer normalisation (``metrics.normalize_vqa_answer``);
- ``anls``: ANLS of the answer against the reference answer (``metrics.anls``): credit
  for near-misses (a dropped character, a changed digit of a long number);
- ``fields``: for constrained (JSON) answers, the reference's leaf fields the answer has
  with an equal value (after the same normalisation), over all the reference's fields.

A row where the reference failed (its ``error`` set) says nothing and is left out; a row
where only the setting failed disagrees. This module is pure Python (no torch, no Ray).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hired_batch.eval import metrics

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
MEASURES = ("exact", "anls", "fields")  # the agreement measures, in report order
TARGET_MEASURE = "exact"  # the measure --target is checked against (the strictest)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share ``successes / n`` (``successes`` may be a sum of
    scores in [0, 1], e.g. ANLS: then the interval treats it as a proportion, an
    approximation). (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    den = 1 + z * z / n
    return max(0.0, (centre - half) / den), min(1.0, (centre + half) / den)


def exact_agree(answer: str, reference: str) -> float:
    """1.0 when equal after the VQA normalisation, else 0.0."""
    return float(metrics.normalize_vqa_answer(answer) == metrics.normalize_vqa_answer(reference))


def anls_agree(answer: str, reference: str) -> float:
    """ANLS of ``answer`` with ``reference`` as the one correct answer."""
    return metrics.anls(answer, [reference])


def parse_json_answer(text: str | None) -> Any:
    """A JSON answer as Python (an object or a list), else None. A Markdown code fence
    around it (```json ... ```) is allowed: models write one."""
    if not text:
        return None
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its path (``a.b``, ``items[0]``); an empty object
    or list is one leaf."""
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{path}.{key}" if path else key).items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{path}[{i}]").items()}
    return {path: value}


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return bool(exact_agree(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def field_agreement(answer: str | None, reference: str | None) -> tuple[int, int] | None:
    """(fields that agree, fields of the reference) when the reference answer is JSON,
    else None. An answer that is not JSON agrees on none of them."""
    ref = parse_json_answer(reference)
    if ref is None:
        return None
    expected = leaves(ref)
    got = leaves(parse_json_answer(answer)) if parse_json_answer(answer) is not None else {}
    return sum(1 for k, v in expected.items() if k in got and _same_leaf(got[k], v)), len(expected)


@dataclass(frozen=True)
class Share:
    """One agreement measure of one setting: a share with its 95 % Wilson interval."""

    value: float  # successes / n
    low: float  # Wilson lower bound
    high: float  # Wilson upper bound
    n: int  # rows (fields, for ``fields``) it is over

    @classmethod
    def of(cls, successes: float, n: int) -> "Share":
        low, high = wilson(successes, n)
        return cls(successes / n if n else float("nan"), low, high, n)


def agreement(answers: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Share | None]:
    """Agreement of ``answers`` with ``reference``, both ``{id: answer or None}`` (None:
    the row failed). Rows the reference failed or lacks are left out; ``fields`` is None
    when no reference answer is JSON."""
    ids = [i for i, ref in reference.items() if ref is not None]
    exact = anls = 0.0
    matched = total = 0
    for i in ids:
        got, ref = answers.get(i), reference[i]
        if got is not None:
            exact += exact_agree(got, ref)
            anls += anls_agree(got, ref)
        counted = field_agreement(got, ref)
        if counted is not None:
            matched, total = matched + counted[0], total + counted[1]
    return {
        "exact": Share.of(exact, len(ids)),
        "anls": Share.of(anls, len(ids)),
        "fields": Share.of(matched, total) if total else None,
    }


# --------------------------------------------------------------------------- the recommendation


@dataclass(frozen=True)
class Candidate:
    """What the recommendation rule knows of one setting."""

    setting: str  # e.g. "hired:0.2"
    cost: float  # predicted cost per million items (lower is cheaper); NaN when unknown
    items_per_s: float  # measured here (calibrate: in the generate calls), the tie-break; NaN ranks last
    low: float  # lower 95 % bound of its agreement with full (``TARGET_MEASURE``)


REFERENCE = "full"  # the setting every other is compared with, and the fallback


def recommend(candidates: Sequence[Candidate], target: float) -> tuple[str, bool]:
    """(setting, met): the cheapest setting whose agreement's lower bound is >= ``target``
    (ties on cost: the faster measured, then the better bound, then the order given);
    (``full``, False) when none is."""
    passing = [(i, c) for i, c in enumerate(candidates) if c.setting != REFERENCE and c.low >= target]
    if not passing:
        return REFERENCE, False

    def key(item):
        i, c = item
        speed = 0.0 if math.isnan(c.items_per_s) else c.items_per_s
        return (c.cost if not math.isnan(c.cost) else math.inf, -speed, -c.low, i)

    return min(passing, key=key)[1].setting, True
