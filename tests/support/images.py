"""Seeded random-pixel pictures for engine tests (attention differs across tokens)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise_images(sizes, seed: int = 0) -> list:
    """One RGB PIL image per (height, width) in ``sizes``, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
