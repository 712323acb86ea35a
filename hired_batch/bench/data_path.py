"""The data path alone: what the preprocessing stage hands the generation stage per item,
and how fast one CPU makes it (no Ray, no model weights).

``python -m hired_batch.bench.data_path --model PATH --sizes 640x480,1024x768,4000x3000``
runs the job's own ``PreprocessStage`` (decode, validate, prompt ids, token plan inputs,
the engine's handoff) over photo-like JPEGs of each size, for each engine, and prints
per item: the JPEG, its uint8 crops, the prompt ids, the bytes the handoff row carries
through Ray's object store (``engine.handoff.item_bytes``, the one measure the job's
``handoff_bytes`` column uses) and its ratio to the target (the encoded image, or the
uint8 crops when smaller, plus prompt ids); and the stage's items per CPU-second (the
process's CPU time, all threads), which sizes the CPUs per GPU (docs/performance.md,
"Data path bytes"). Where the handoff is lean, it also times what the generation actor
now does per item to make pixels (HF: ``handoff.pixel_values``; vLLM: ``handoff.decode``).
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np

BATCH = 16  # rows per preprocessing call, as the job's default preprocessing batch


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (quality 90): smooth colour fields plus sensor-like grain, so its
    size per pixel is a camera photo's (about 0.3 bytes/px), unlike flat synthetic shapes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8))
    base = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 4, (height, width, 1)).astype(np.int16)
    img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _stage(model: str, engine: str):
    from hired_batch.config import ColumnSpec
    from hired_batch.job.stages import PreprocessStage

    return PreprocessStage(model, ColumnSpec(), engine=engine)


def _batch(files: list[bytes]) -> dict:
    n = len(files)
    return {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "image": np.array(files, dtype=object),
        "question": np.array(["What is in the picture?"] * n, dtype=object),
    }


def _crop_bytes(stage, file: bytes) -> int:
    """Bytes of one image's uint8 crops: one byte per value of the processor's pixel values."""
    from hired_batch.engine.inputs import decode_image

    image, _ = decode_image(file)
    return stage.pre.pixels(image)[0].size if hasattr(stage.pre, "pixels") else stage.pre(image, "?").pixel_values.size


def _generation_side_s(stage, rows: list[dict], engine: str) -> float | None:
    """CPU seconds per item the generation actor spends making pixels from a lean
    handoff (None for a handoff that is not lean: the float pixels or RGB came ready)."""
    from hired_batch.engine import handoff

    if "image" not in rows[0]:
        return None
    t0 = time.process_time()
    for r in rows:
        if engine == "hf":
            handoff.pixel_values(stage.pre, r["image"], r["image_kind"], r["n_parts"])
        else:
            handoff.decode(r["image"])
    return (time.process_time() - t0) / len(rows)


def measure(model: str, engine: str, width: int, height: int, items: int) -> dict:
    """One engine at one image size: bytes per item and items per CPU-second."""
    from hired_batch.engine.handoff import item_bytes

    stage = _stage(model, engine)
    files = [photo_jpeg(width, height, seed=i) for i in range(items)]
    stage(_batch(files[:2]))  # warm: first calls load and check lazily
    rows, cpu, wall = [], 0.0, 0.0
    for k in range(0, items, BATCH):
        c0, w0 = time.process_time(), time.perf_counter()
        table = stage(_batch(files[k : k + BATCH]))
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        rows += table.to_pylist()
    if any(r["error"] for r in rows):
        raise RuntimeError(f"{engine} {width}x{height}: error rows: {rows[0]['error']}")
    jpeg = float(np.mean([len(f) for f in files]))
    crops = float(_crop_bytes(stage, files[0]))
    ids = float(np.mean([len(r["input_ids"]) for r in rows]))
    handoff = float(np.mean([item_bytes(r.values()) for r in rows]))
    target = (min(jpeg, crops) if engine == "hf" else jpeg) + ids  # vLLM takes an image, not crops
    return dict(
        engine=engine,
        size=f"{width}x{height}",
        items=items,
        jpeg_bytes=jpeg,
        crops_bytes=crops,
        ids_bytes=ids,
        handoff_bytes=handoff,
        handoff_over_target=handoff / target,
        kinds=sorted({str(r.get("image_kind")) for r in rows if "image_kind" in r}),
        items_per_cpu_s=items / cpu,
        items_per_wall_s=items / wall,
        generation_side_cpu_s=_generation_side_s(stage, rows, engine),
    )


def table(results: list[dict]) -> str:
    """Markdown: one line per (engine, size)."""
    lines = [
        "| engine | image | JPEG MB | uint8 crops MB | prompt ids B | handoff MB per item | / target | "
        "preprocess items per CPU-s | generation-side CPU ms per item |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g = r["generation_side_cpu_s"]
        kinds = f" ({', '.join(r['kinds'])})" if r["kinds"] else ""
        lines.append(
            f"| {r['engine']} | {r['size']} | {r['jpeg_bytes'] / 1e6:.3f} | {r['crops_bytes'] / 1e6:.3f} | "
            f"{r['ids_bytes']:.0f} | {r['handoff_bytes'] / 1e6:.3f}{kinds} | {r['handoff_over_target']:.2f} | "
            f"{r['items_per_cpu_s']:.1f} | {'-' if g is None else f'{g * 1e3:.1f}'} |"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def main(argv=None) -> int:
    """The command line: print the table (and write the JSON rows with ``--json``)."""
    ap = argparse.ArgumentParser(prog="python -m hired_batch.bench.data_path", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (only its processor is loaded)")
    ap.add_argument("--sizes", default="640x480,1024x768,4000x3000", help="WxH,WxH,...")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--items", type=int, default=32, help="items per size (12 MP sizes: a quarter, at least 4)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    results = []
    for engine in a.engines.split(","):
        for w, h in map(_size, a.sizes.split(",")):
            n = a.items if w * h <= 4_000_000 else max(4, a.items // 4)
            results.append(measure(a.model, engine, w, h, n))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if a.json:
        from hired_batch.jsonio import write_json

        write_json(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
