"""What the bench feeds the model, and how its tables print numbers: shared by the
sweep (``engine_bench``), ``--ideal-only`` (``ideal_bench``) and ``--pipeline``
(``job_bench``), which is why it is its own module (the three import it; it
imports none of them). JSON is written by ``hired_batch.jsonio``.
"""

from __future__ import annotations

# (height, width): a 2x2 LLaVA-NeXT canvas filled exactly, a 4:3 photo (2x2 with
# padding), a tall 3x1 and a wide 1x2: 2928, 2340, 2376, 1752 full visual tokens.
SIZES = [(672, 672), (480, 640), (1008, 336), (336, 672)]
QUESTIONS = ["What is in the image?", "How many people are there?", "What color is the car?",
             "Is there a dog in the picture?"]


def workload(n: int, seed: int = 0):
    """n (PIL image, question) pairs cycling through SIZES and QUESTIONS (seeded: same n, same pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        out.append((Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), QUESTIONS[i % len(QUESTIONS)]))
    return out


def fmt(v, spec="{:.2f}"):
    """A table cell: ``-`` for a missing value."""
    return "-" if v is None else spec.format(v)


def speedups_over_full(rows: list[dict], key: str, is_auto) -> list:
    """``row[key]`` over the same key of the ``full`` row at the same batch size (an
    automatic-batch row: over full's automatic row), per row; None where there is none."""
    out = []
    for r in rows:
        ref = [f for f in rows if f["selector"] == "full" and is_auto(f) == is_auto(r)
               and (is_auto(r) or f["batch_size"] == r["batch_size"])]
        out.append(r[key] / ref[0][key] if ref else None)
    return out
