"""Score a finished job's output Parquet against the ground truth a task preset kept.

The task presets (``hired_batch.job.tasks.TASKS``) say which ground-truth columns a job
keeps and which metric scores them.
``score_output(path, task)`` reads the job's output (columns ``id``, ``answer``,
``error`` plus the kept ground-truth columns), scores every row with
``hired_batch.eval.metrics`` and returns a dict; ``format_score`` turns it into a report.

Conventions shared with the pipeline:

- A kept ground-truth column ``name`` is written to the output as ``gt_<name>``
  (``gt_column``), because several datasets call their ground truth ``answer``, which
  is also the job's prediction column. Unprefixed names are accepted too when they
  cannot be confused with the job's own columns.
- A row whose ``error`` is set is wrong (scores 0) and is counted in ``n_errors``;
  it is never dropped, so errors cannot raise a score.
- ``score`` is in percent (0-100), like the paper's tables, except MME, which is in
  MME points (perception sum, max 2000).

This module does not run models, build Ray pipelines, download datasets or parse
command lines; it imports neither torch nor Ray.
"""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from hired_batch.config import ConfigError
from hired_batch.eval import metrics
from hired_batch.job.tasks import TASKS, TaskPreset, get_task

JOB_COLUMNS = ("id", "answer", "error")  # what every job output has
GT_PREFIX = "gt_"  # prefix of kept ground-truth columns in the output


def gt_column(name: str) -> str:
    """Output column name of the kept ground-truth column ``name``."""
    return GT_PREFIX + name


# --------------------------------------------------------------------------- reading


def _resolve_gt(name: str, available: Sequence[str]) -> str | None:
    """Output column holding ground-truth column ``name``, or None if absent."""
    if gt_column(name) in available:
        return gt_column(name)
    if name not in JOB_COLUMNS and name in available:
        return name
    return None


def _column_map(preset: TaskPreset, available: Sequence[str]) -> dict[str, str]:
    """Key -> output column, keys being the job's columns and gt_<name> for ground truth;
    ValueError naming what is missing."""
    found = {c: c for c in JOB_COLUMNS if c in available}
    found |= {gt_column(n): o for n in preset.kept_columns if (o := _resolve_gt(n, available))}
    expected = list(JOB_COLUMNS) + [gt_column(n) for n in preset.kept_columns]
    missing = [c for c in expected if c not in found]
    if missing:
        raise ConfigError(
            f"task {preset.name!r}: output expected columns {expected} (ground truth "
            f"as gt_<name>, or <name> where it is not a job column), missing "
            f"{missing}; found columns {sorted(available)}"
        )
    return found


def _read_output(path: str, preset: TaskPreset, filesystem=None) -> dict[str, list]:
    """Read only the needed columns of a Parquet file or directory, as Python lists."""
    import pyarrow.dataset as ds  # imported here: only scoring needs it

    dataset = ds.dataset(path, format="parquet", filesystem=filesystem)
    columns = _column_map(preset, dataset.schema.names)
    table = dataset.to_table(columns=list(dict.fromkeys(columns.values())))
    return {name: table.column(out).to_pylist() for name, out in columns.items()}


@dataclass(frozen=True)
class _Row:
    id: Any  # the output's id
    prediction: str | None  # the model's answer; None when the row failed
    truth: dict[str, Any]  # kept ground-truth columns, by dataset name
    category: str | None  # value of the preset's category column


def _truth(data: dict[str, list], i: int, preset: TaskPreset) -> dict[str, Any]:
    """Kept ground-truth values of row ``i``; ValueError on nulls (no public answers)."""
    truth = {n: data[gt_column(n)][i] for n in preset.kept_columns}
    if any(v is None for v in truth.values()):
        raise ConfigError(
            f"row id={data['id'][i]!r}: expected ground truth in "
            f"{list(truth)}, found nulls in {truth}; does split "
            f"{preset.split!r} have public answers?"
        )
    return truth


def _rows(data: dict[str, list], preset: TaskPreset) -> list[_Row]:
    rows = []
    for i, row_id in enumerate(data["id"]):
        truth = _truth(data, i, preset)
        failed = data["error"][i] is not None
        prediction = None if failed else (data["answer"][i] or "")
        category = truth[preset.category_column] if preset.category_column else None
        rows.append(_Row(row_id, prediction, truth, category))
    return rows


# --------------------------------------------------------------------------- per-row metrics


def _answer_strings(value: Any) -> list[str]:
    """Reference answers as strings: VQAv2 stores dicts with an "answer" key."""
    if isinstance(value, str):
        return [value]
    return [v["answer"] if isinstance(v, Mapping) else str(v) for v in value]


def _choice_correct(pred: str, truth: Mapping) -> float:
    letter = metrics.extract_choice_letter(pred, len(truth["choices"]))
    return float(letter == string.ascii_uppercase[int(truth["answer"])])


_ROW_METRICS: dict[str, Callable[[str, Mapping], float]] = {
    "vqa_accuracy": lambda p, t: metrics.vqa_accuracy(p, _answer_strings(t["answers"])),
    "anls": lambda p, t: metrics.anls(p, _answer_strings(t["answers"])),
    "relaxed_accuracy": lambda p, t: metrics.relaxed_accuracy(p, str(t["answer"])),
    "choice_accuracy": _choice_correct,
    "ocrbench_match": lambda p, t: metrics.ocrbench_match(p, _answer_strings(t["answer"]), dataset=t.get("dataset")),
}


# --------------------------------------------------------------------------- ground-truth shapes

VQA_HUMAN_ANSWERS = 10  # human answers per question in VQAv2/TextVQA: vqa_accuracy's leave-one-out needs them


@dataclass(frozen=True)
class TruthShape:
    """What one ground-truth column must hold in every row for a metric to mean anything."""

    column: str  # dataset column name (gt_<column> in the output)
    expects: str  # the shape in words, for the message
    fits: Callable[[Any], bool]  # True when one row's value has that shape


def _is_str_list(v: Any, n: int | None = None) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) > 0
        and (n is None or len(v) == n)
        and all(isinstance(a, str) or (isinstance(a, Mapping) and isinstance(a.get("answer"), str)) for a in v)
    )


def _is_number_or_str(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_id(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _is_yes_no(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() in ("yes", "no")


def _is_index(v: Any) -> bool:
    return _is_id(v) and str(v).strip().isdigit()


# Every column each metric reads (_ROW_METRICS and the aggregates), with its shape: one
# place, checked on every row before scoring, so a wrong shape cannot score quietly.
TRUTH_SHAPES: dict[str, tuple[TruthShape, ...]] = {
    "vqa_accuracy": (
        TruthShape(
            "answers",
            f"a list of {VQA_HUMAN_ANSWERS} human answers (strings, or VQAv2's {{answer: ...}} dicts)",
            lambda v: _is_str_list(v, VQA_HUMAN_ANSWERS),
        ),
    ),
    "anls": (
        TruthShape(
            "answers",
            "a string or a non-empty list of reference answer strings",
            lambda v: isinstance(v, str) or _is_str_list(v),
        ),
    ),
    "relaxed_accuracy": (TruthShape("answer", "a single answer (a string or a number)", _is_number_or_str),),
    "choice_accuracy": (
        TruthShape("answer", "the index of the right choice (an integer)", _is_index),
        TruthShape("choices", "a non-empty list of the options (strings)", _is_str_list),
    ),
    "ocrbench_match": (
        TruthShape(
            "answer",
            "a string or a non-empty list of reference answer strings",
            lambda v: isinstance(v, str) or _is_str_list(v),
        ),
        TruthShape("dataset", "the source dataset's name (a string)", lambda v: isinstance(v, str)),
    ),
    "pope": (TruthShape("answer", '"yes" or "no"', _is_yes_no),),
    "mme": (
        TruthShape("answer", '"Yes" or "No"', _is_yes_no),
        TruthShape("question_id", "the image's id (a string or an integer)", _is_id),
    ),
}


def _describe(v: Any) -> str:
    """A value's shape in words, for a refusal ("a single string 'cat'", "a list of 1")."""
    shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
    if isinstance(v, str):
        return f"a single string {shown}"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)}: {shown}"
    return f"{type(v).__name__} {shown}"


def check_truth_shapes(rows: Sequence[_Row], preset: TaskPreset) -> None:
    """ValueError when a ground-truth column does not have the shape the task's metric
    needs (e.g. one answer where vqa_accuracy needs ten): such a score would be wrong
    without any sign of it (one reference answer makes every VQA score 0)."""
    for shape in TRUTH_SHAPES[preset.metric]:
        bad = [r for r in rows if not shape.fits(r.truth[shape.column])]
        if bad:
            raise ConfigError(
                f"task {preset.name!r}: {preset.metric} expects {shape.expects} per row in ground-truth column "
                f"{shape.column!r} ({gt_column(shape.column)} in the output); found "
                f"{_describe(bad[0].truth[shape.column])} in row id={bad[0].id!r} "
                f"({len(bad)} of {len(rows)} rows do not fit); no score reported"
            )


def _row_score(metric: str, row: _Row) -> float:
    """One row's score in [0, 1]; failed rows score 0."""
    if row.prediction is None:
        return 0.0
    try:
        return _ROW_METRICS[metric](row.prediction, row.truth)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"row id={row.id!r}: cannot score {metric} with ground truth {row.truth}: {exc}") from exc


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def _by_category(rows: Sequence[_Row], values: Sequence) -> dict[str, list]:
    groups: dict[str, list] = defaultdict(list)
    for row, value in zip(rows, values):
        groups[str(row.category)].append(value)
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------- aggregates
# Each returns (score, details or None, per_category or None).


def _aggregate_mean(metric: str, rows: Sequence[_Row], preset: TaskPreset):
    values = [_row_score(metric, r) for r in rows]
    per_cat = None
    if preset.category_column:
        per_cat = {c: _mean_percent(v) for c, v in _by_category(rows, values).items()}
    return _mean_percent(values), None, per_cat


def _pope_parts(rows: Sequence[_Row]) -> dict:
    preds = [metrics.yes_no(r.prediction) for r in rows]
    labels = [str(r.truth["answer"]) for r in rows]
    return {k: 100.0 * v for k, v in metrics.pope_scores(preds, labels).items()}


def _aggregate_pope(metric: str, rows: Sequence[_Row], preset: TaskPreset):
    """Headline F1 (POPE's and LLaVA's reported number); all five ratios in details."""
    details = _pope_parts(rows)
    per_cat = None
    if preset.category_column:
        groups = _by_category(rows, rows)
        per_cat = {c: _pope_parts(g)["f1"] for c, g in groups.items()}
    return details["f1"], details, per_cat


def _aggregate_mme(metric: str, rows: Sequence[_Row], preset: TaskPreset):
    """Headline: perception sum (points); cognition and acc/acc+ in details."""
    result = metrics.mme_scores(
        {
            "category": r.category,
            "question_id": r.truth["question_id"],
            "prediction": r.prediction,
            "answer": r.truth["answer"],
        }
        for r in rows
    )
    details = {
        "perception": result["perception"],
        "cognition": result["cognition"],
        "total": result["perception"] + result["cognition"],
        "missing_categories": result["missing_categories"],
    }
    per_cat = {c: v["score"] for c, v in result["per_category"].items()}
    return result["perception"], details, per_cat


METRICS: dict[str, tuple[Callable, str]] = {  # metric -> (aggregate, unit of score)
    "vqa_accuracy": (_aggregate_mean, "%"),
    "anls": (_aggregate_mean, "%"),
    "relaxed_accuracy": (_aggregate_mean, "%"),
    "choice_accuracy": (_aggregate_mean, "%"),
    "ocrbench_match": (_aggregate_mean, "%"),
    "pope": (_aggregate_pope, "% (F1)"),
    "mme": (_aggregate_mme, "points (perception, max 2000)"),
}


# --------------------------------------------------------------------------- API


def score_output(path: str, task: str, *, filesystem=None) -> dict:
    """Score the job output at ``path`` (a Parquet file or directory) for ``task``.

    ``filesystem`` is a pyarrow or fsspec filesystem for remote paths (e.g. S3).
    Returns ``{"task", "metric", "score", "unit", "n_rows", "n_scored", "n_errors"}``
    plus ``"details"`` (POPE, MME) and ``"per_category"`` (presets with a category
    column). Failed rows count as wrong in ``score`` and are reported in ``n_errors``.
    """
    preset = get_task(task)
    rows = _rows(_read_output(path, preset, filesystem), preset)
    if not rows:
        raise ConfigError(f"task {task!r}: expected scored rows in {path!r}, found 0 rows")
    check_truth_shapes(rows, preset)
    aggregate, unit = METRICS[preset.metric]
    score, details, per_category = aggregate(preset.metric, rows, preset)
    n_errors = sum(r.prediction is None for r in rows)
    result = {
        "task": task,
        "metric": preset.metric,
        "score": score,
        "unit": unit,
        "n_rows": len(rows),
        "n_scored": len(rows) - n_errors,
        "n_errors": n_errors,
    }
    if details is not None:
        result["details"] = details
    if per_category is not None:
        result["per_category"] = per_category
    return result


def _paper_line(task: str) -> str | None:
    preset = TASKS.get(task)
    if preset is None or preset.paper_full is None:
        return None
    return f"paper      LLaVA-NeXT-7B full {preset.paper_full}, HiRED-20% {preset.paper_hired20}"


def _format_value(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_score(result: Mapping[str, Any]) -> str:
    """A readable multi-line report of a ``score_output`` result."""
    lines = [
        f"task       {result['task']} (metric: {result['metric']})",
        f"score      {result['score']:.2f} {result.get('unit', '')}".rstrip(),
        f"rows       {result['n_rows']} ({result['n_scored']} scored, {result['n_errors']} errors counted as wrong)",
    ]
    if paper := _paper_line(result["task"]):
        lines.append(paper)
    if result.get("details"):
        lines.append("details")
    for key, value in result.get("details", {}).items():
        lines.append(f"  {key:<20} {_format_value(value)}")
    if result.get("per_category"):
        lines.append("per category")
        width = max(len(c) for c in result["per_category"])
        for category, value in result["per_category"].items():
            lines.append(f"  {category:<{width}}  {value:.2f}")
    return "\n".join(lines)


def readme_table() -> str:
    """Markdown table of the presets with the paper's LLaVA-NeXT-7B numbers."""
    lines = ["| task | dataset | metric | full (paper) | HiRED-20% (paper) |", "|---|---|---|---|---|"]
    for p in TASKS.values():
        full = "—" if p.paper_full is None else f"{p.paper_full}"
        hired = "—" if p.paper_hired20 is None else f"{p.paper_hired20}"
        lines.append(f"| {p.name} | {p.hf_dataset} | {p.metric} | {full} | {hired} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a user's own labels
# `score --truth-column NAME --metric M` and `calibrate --truth-column`: one reference
# column of the user's, one metric of these (the presets' metrics, for one column).


def _references(truth: Any) -> list[str]:
    """A truth value as reference strings: a string, a number, or a list of them."""
    if isinstance(truth, (list, tuple)):
        return _answer_strings(truth)
    return [str(truth)]


def _vqa_truth(pred: str, truth: Any) -> float:
    refs = _references(truth)
    if len(refs) == VQA_HUMAN_ANSWERS:  # the official leave-one-out over 10 human answers
        return metrics.vqa_accuracy(pred, refs)
    norm = metrics.normalize_vqa_answer(pred)
    return float(any(norm == metrics.normalize_vqa_answer(r) for r in refs))


def _choice_truth(pred: str, truth: Any) -> float:
    """The truth: the right option's letter ("B") or its 0-based index (1)."""
    text = str(truth).strip()
    letter = string.ascii_uppercase[int(text)] if text.isdigit() else text.upper()
    return float(metrics.extract_choice_letter(pred, len(string.ascii_uppercase)) == letter)


TRUTH_METRICS: dict[str, tuple[Callable[[str, Any], float], str]] = {  # --metric -> (row score, truth it takes)
    "exact": (lambda p, t: max(metrics.exact_match(p, r) for r in _references(t)), "a string (or a list: any)"),
    "vqa": (
        _vqa_truth,
        "a string or a list; VQA-normalised exact match against any, or VQA accuracy over a list of 10",
    ),
    "anls": (lambda p, t: metrics.anls(p, _references(t)), "a string or a list of reference strings"),
    "relaxed": (lambda p, t: metrics.relaxed_accuracy(p, str(t)), "a single answer (a number or a string)"),
    "choice": (_choice_truth, "the right option's letter or 0-based index"),
}


def check_truth_metric(metric: str) -> None:
    """ConfigError unless ``metric`` is one of ``TRUTH_METRICS``."""
    if metric not in TRUTH_METRICS:
        raise ConfigError(f"--metric must be one of {sorted(TRUTH_METRICS)}, got {metric!r}")


def score_truth_rows(predictions: Sequence[str | None], truths: Sequence[Any], metric: str) -> list[float]:
    """Per-row scores in [0, 1] of ``predictions`` (None: the row failed, scores 0) against
    ``truths`` with ``metric`` (``TRUTH_METRICS``); a null truth is a ConfigError."""
    check_truth_metric(metric)
    score, shape = TRUTH_METRICS[metric]
    out = []
    for i, (pred, truth) in enumerate(zip(predictions, truths)):
        if truth is None or (isinstance(truth, (list, tuple)) and not truth):
            raise ConfigError(f"--metric {metric} expects {shape} in every row's truth; row {i} has {truth!r}")
        try:
            out.append(0.0 if pred is None else score(pred, truth))
        except (ValueError, TypeError, IndexError) as exc:
            raise ConfigError(
                f"--metric {metric} expects {shape} in every row's truth; row {i} has {truth!r} ({exc})"
            ) from None
    return out


def truth_output_column(name: str, available: Sequence[str]) -> str:
    """The output column holding the kept truth column ``name``; ConfigError naming what is there."""
    found = _resolve_gt(name, available)
    if found is None:
        raise ConfigError(
            f"--truth-column {name!r}: expected it in the output (as {name} or {gt_column(name)}; "
            f"run with --keep-column {name}), found columns {sorted(available)}"
        )
    return found


def score_truth(path: str, truth_column: str, metric: str, *, filesystem=None) -> dict:
    """Score the job output at ``path`` against its kept column ``truth_column`` with
    ``metric`` (``TRUTH_METRICS``): ``{"metric", "truth_column", "score" (percent),
    "low", "high" (95 % Wilson, percent), "unit", "n_rows", "n_scored", "n_errors"}``."""
    import pyarrow.dataset as ds

    from hired_batch.eval.agreement import wilson

    check_truth_metric(metric)
    dataset = ds.dataset(path, format="parquet", filesystem=filesystem)
    column = truth_output_column(truth_column, dataset.schema.names)
    table = dataset.to_table(columns=["answer", "error", column])
    errors = table.column("error").to_pylist()
    preds = [None if e is not None else (a or "") for a, e in zip(table.column("answer").to_pylist(), errors)]
    if not preds:
        raise ConfigError(f"--truth-column {truth_column!r}: expected scored rows in {path!r}, found 0 rows")
    values = score_truth_rows(preds, table.column(column).to_pylist(), metric)
    low, high = wilson(sum(values), len(values))
    n_errors = sum(e is not None for e in errors)
    return {
        "metric": metric,
        "truth_column": truth_column,
        "score": _mean_percent(values),
        "low": 100 * low,
        "high": 100 * high,
        "unit": "%",
        "n_rows": len(values),
        "n_scored": len(values) - n_errors,
        "n_errors": n_errors,
    }


def format_truth_score(result: Mapping[str, Any]) -> str:
    """A readable report of a ``score_truth`` result."""
    return "\n".join(
        [
            f"truth      {result['truth_column']} (metric: {result['metric']})",
            f"score      {result['score']:.2f} % (95 % interval {result['low']:.1f}-{result['high']:.1f})",
            f"rows       {result['n_rows']} ({result['n_scored']} scored, {result['n_errors']} errors counted as wrong)",
        ]
    )
