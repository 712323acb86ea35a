"""A large synthetic input for scale measurements: N rows of small images in K Parquet
shards, with a known share of rows that must fail (``python -m hired_batch.bench.scale_data``).

A handful of distinct small JPEGs is encoded once and repeated (Parquet's dictionary
encoding stores each once per row group, so a million rows take a few MB of disk), with
questions that differ per row. Every ``bad_every``-th row is bad in one of ``BAD_KINDS``
ways, in turn, so a run's failed rows by reason are known in advance (``expected_failures``).
"""

from __future__ import annotations

import argparse
import io
import pathlib

SIZES = ((48, 64), (64, 48), (96, 96), (120, 160), (480, 640))  # (height, width); the last one row in 16
BAD_KINDS = ("not_an_image", "null_question", "image_token", "too_long")
LONG_QUESTION = "go " * 4500  # ~4500 tokens: over a 4096-token context with the image, under the 20,000 chars limit


def photo(height: int, width: int, seed: int = 0) -> bytes:
    """One photo-like JPEG of (height, width): shapes (``make_synthetic_image``) under
    sensor-like noise, quality 90, so its file size and decode time are a photo's, not a
    flat drawing's."""
    import numpy as np
    from PIL import Image

    from hired_batch.engine.inputs import make_synthetic_image

    rgb = np.asarray(make_synthetic_image(width, height, seed), np.int16)
    noise = np.random.default_rng(seed).normal(0, 8, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def images() -> list[bytes]:
    """The distinct JPEGs, one per SIZES entry (smooth gradients: small files)."""
    import numpy as np
    from PIL import Image

    out = []
    for k, (h, w) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 40 * k)], axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bad_kind(i: int, bad_every: int) -> str | None:
    """Which way row ``i`` is bad (None: a good row)."""
    if not bad_every or i % bad_every != bad_every - 1:
        return None
    return BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]


def expected_failures(rows: int, bad_every: int) -> dict:
    """{bad kind: rows} that ``write_shards(rows=rows, bad_every=bad_every)`` writes."""
    counts = {}
    for i in range(bad_every - 1, rows, bad_every or rows + 1):
        kind = bad_kind(i, bad_every)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def shard_table(start: int, stop: int, bad_every: int, encoded: list[bytes]):
    """Rows ``start`` .. ``stop - 1`` as an Arrow table (id, image, question)."""
    import pyarrow as pa

    ids, imgs, questions = [], [], []
    for i in range(start, stop):
        kind = bad_kind(i, bad_every)
        ids.append(f"row-{i:09d}")
        size = 0 if len(encoded) == 1 else len(encoded) - 1 if i % 16 == 15 else i % (len(encoded) - 1)
        imgs.append(b"this is not an image" if kind == "not_an_image" else encoded[size])
        q = f"What is in picture {i}?"
        questions.append(
            {"null_question": None, "image_token": f"Is <image> {i} here?", "too_long": LONG_QUESTION}.get(kind, q)
        )
    return pa.table({"id": ids, "image": pa.array(imgs, pa.binary()), "question": pa.array(questions, pa.string())})


def write_shards(out, rows: int, shards: int, bad_every: int = 100, size=None) -> list[pathlib.Path]:
    """Write ``rows`` rows in ``shards`` Parquet files under ``out``; returns their paths.
    ``size``: (height, width) of one ``photo`` every good row carries (default: the small SIZES)."""
    import pyarrow.parquet as pq

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoded = [photo(*size)] if size else images()
    bounds = [rows * k // shards for k in range(shards + 1)]
    paths = []
    for k in range(shards):
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(shard_table(bounds[k], bounds[k + 1], bad_every, encoded), path, use_dictionary=True)
        paths.append(path)
    return paths


def parse_size(text: str) -> tuple[int, int]:
    """ "480x640" -> (480, 640): height x width."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hired_batch.bench.scale_data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write the shards to")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=200)
    p.add_argument("--bad-every", type=int, default=100, help="every Nth row is bad (0: none)")
    p.add_argument("--size", help="HEIGHTxWIDTH: one photo-like image of this size in every good row")
    a = p.parse_args(argv)
    write_shards(a.out, a.rows, a.shards, a.bad_every, parse_size(a.size) if a.size else None)
    print(f"wrote {a.rows} rows in {a.shards} shards to {a.out}; bad rows: {expected_failures(a.rows, a.bad_every)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
