"""Batches for the many-questions tests (``--ask`` and list question columns), built by
the preprocessing stage as the job builds them, for both engines' tests."""

from __future__ import annotations

import numpy as np

from hired_batch.config import ColumnSpec
from hired_batch.job.ask import parse_asks
from hired_batch.job.stages import PreprocessStage

# three named questions: one with its own answer length, one constrained to a label set
ASKS = parse_asks(
    {
        "what": "What is this?",
        "count": {"question": "How many people are there?", "max_new_tokens": 3},
        "place": {"question": "Indoor or outdoor?", "choices": ["indoor", "outdoor"], "max_new_tokens": 16},
    }
)


def column(values) -> np.ndarray:
    """An object column as Ray Data's numpy batches hold one (lists stay one value each)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def as_batch(table) -> dict:
    """A preprocessing stage's Arrow output as the generation stage's numpy batch."""
    return {k: column(table.column(k).to_pylist()) for k in table.column_names}


def ask_batch(model, images: list, asks=ASKS, engine: str = "hf") -> dict:
    """The handoff batch of ``images`` (encoded bytes) under ``--ask``: one row per image."""
    pre = PreprocessStage(str(model), ColumnSpec(question_column=None, ask=asks), engine=engine)
    return as_batch(pre({"id": column([f"img{i}" for i in range(len(images))]), "image": column(images)}))


def separate_batch(model, images: list, asks=ASKS, engine: str = "hf") -> dict:
    """The same questions as separate rows (id ``img<i>/<name>``), each with its own options."""
    rows = [(f"img{i}/{a.name}", im, a.question, a.options) for i, im in enumerate(images) for a in asks]
    pre = PreprocessStage(str(model), ColumnSpec(), engine=engine)
    return as_batch(
        pre({k: column([r[j] for r in rows]) for j, k in enumerate(("id", "image", "question", "sampling"))})
    )


def vision_runs(path) -> list[int]:
    """The images of each vision-tower run logged to ``path`` (``vision.VISION_LOG_ENV``)."""
    return [int(line) for line in open(path).read().split()] if path.exists() else []
