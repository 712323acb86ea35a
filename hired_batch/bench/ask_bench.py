"""Questions per image (``--ask``): k questions asked of each image at once against the
same k questions as k separate rows, through the job's own generation stage, on one
engine; beside each measured saving, the ideal model's (``ideal.ask_saving``).

    python -m hired_batch.bench.ask_bench --preset scaled --engine hf --selectors full,hired:0.2 \\
        --ks 1,2,4,8 --images 2 --max-new-tokens 8

Times the generation stage (``GenerateStage.answer`` on a preprocessed batch; the
preprocessing, which ``--ask`` also runs once per image, is left out), best of
``--repeats``, after one warm-up; vLLM's prefix, encoder and multimodal caches are
emptied before each timed call (the bench asks the same images again). Answers have a fixed length (EOS suppressed:
``min_new_tokens`` = ``max_new_tokens``), so both sides decode the same tokens.

Two baselines of k separate rows: ``alone``, each question with its own copy of the
image (one pixel differs, so no engine cache can share anything between them: what the
ideal model's separate rows are, and what the target compares with), and ``same``, the
k rows with the same image, as a user's rows would be: the HF engine shares nothing
between rows, while vLLM's encoder and prefix caches share the image between rows in
flight together (measured on vLLM only; ``--same`` on HF too).
"""

from __future__ import annotations

import argparse
import asyncio
import time

# distinct questions of similar length, as an annotation job asks them
QUESTIONS = (
    "What is the main object?",
    "How many people are there?",
    "Is it indoors or outdoors?",
    "What color is the sky?",
    "Is there any text visible?",
    "What time of day is it?",
    "Is there an animal here?",
    "What is the weather like?",
)
SIZES = [(500, 333), (336, 672), (672, 336), (600, 600)]  # (h, w) of the bench's images, in turn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="scaled")
    p.add_argument("--model", help="a checkpoint directory instead of a preset")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm"))
    p.add_argument("--selectors", default="full,hired:0.2")
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--same", action="store_true", help="also time same-image separate rows (always on vLLM)")
    p.add_argument("--memory-limit", default="2GB", help="vLLM's KV cache")
    p.add_argument("--ideal-only", action="store_true", help="no model run: the ideal model's savings for --preset")
    p.add_argument("--peak-tflops", type=float, help="with --ideal-only: the machine's FLOP/s")
    p.add_argument("--mem-bw-gbs", type=float, help="with --ideal-only: the machine's memory bandwidth")
    p.add_argument("--dtype-bytes", type=int, default=2, help="with --ideal-only: bytes per parameter")
    args = p.parse_args(argv)
    from hired_batch.bench import ideal
    from hired_batch.bench.model_sizes import ensure_checkpoint

    if args.ideal_only:
        return ideal_only(args)

    path = args.model or str(ensure_checkpoint(args.preset, quiet=True))
    ks = [int(k) for k in args.ks.split(",")]
    roof = ideal.calibrate()
    print(
        f"# ask bench: {args.model or args.preset}, engine {args.engine}, {args.images} images, "
        f"max_new_tokens {args.max_new_tokens}, roofline {roof.flops_per_s / 1e12:.2f} TFLOP/s "
        f"{roof.bytes_per_s / 1e9:.1f} GB/s"
    )
    print(
        "| engine | selector | k | separate rows s | --ask s | measured saving | ideal saving | measured/ideal "
        "| same-image rows s | saving vs same-image rows |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.selectors.split(","):
        for row in run_selector(path, spec, ks, args, roof):
            same = row["same_s"]
            print(
                f"| {args.engine} | {spec} | {row['k']} | {row['separate_s']:.2f} | {row['ask_s']:.2f} | "
                f"{row['saving']:.0%} | {row['ideal']:.0%} | {row['ratio']:.2f} | "
                + (f"{same:.2f} | {1 - row['ask_s'] / same:.0%} |" if same else "| |")
            )
    return 0


N_TEXT, N_QUESTION = 20, 14  # prompt text tokens of a short question, and those after the image token


def ideal_only(args) -> int:
    """The ideal model's saving of ``--ask`` for a preset's shapes on a roofline you give."""
    from hired_batch.bench import ideal
    from hired_batch.bench.model_sizes import get_preset

    d = get_preset(args.preset).dims(args.dtype_bytes)
    roof = ideal.Roofline(args.peak_tflops * 1e12, args.mem_bw_gbs * 1e9)
    print(
        f"# ideal --ask saving: preset {args.preset}, {args.dtype_bytes} bytes/param, roofline {args.peak_tflops} "
        f"TFLOP/s {args.mem_bw_gbs} GB/s, {args.images} images per batch, max_new_tokens {args.max_new_tokens}"
    )
    print("| selector | k | separate rows s | --ask s | ideal saving |")
    print("|---|---|---|---|---|")
    for spec in args.selectors.split(","):
        sel = selection_of(spec)
        items = [ideal.item_tokens(d, SIZES[i % len(SIZES)], sel, N_TEXT) for i in range(args.images)]
        for k in (int(k) for k in args.ks.split(",")):
            sep, shared = ideal.ask_times(d, items, N_QUESTION, k, args.max_new_tokens, roof)
            print(f"| {spec} | {k} | {sep:.3f} | {shared:.3f} | {1 - shared / sep:.0%} |")
    return 0


def selection_of(spec: str):
    """``full`` or ``hired:0.2`` as a SelectionConfig."""
    from hired_batch.config import SelectionConfig

    name, _, budget = spec.partition(":")
    return SelectionConfig(selector=name, budget=float(budget)) if budget else SelectionConfig(selector=name)


def run_selector(path: str, spec: str, ks: list, args, roof) -> list[dict]:
    """One engine under one selection: for each k, the two timings and the ideal saving."""
    from hired_batch.config import GenerationConfig, ModelConfig

    sel = selection_of(spec)
    n = args.max_new_tokens
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
    model = ModelConfig(path, dtype="float32", device="cpu", engine=args.engine)
    engine = _start(model, sel, gen, args)
    try:
        return asyncio.run(_measure(path, model, sel, gen, engine, ks, args, roof))
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()


def _start(model, sel, gen, args):
    if args.engine == "hf":
        from hired_batch.engine.hf import HiredEngine

        return HiredEngine.load(model, sel, gen)
    from hired_batch.engine.vllm.backend import VllmBackend

    return VllmBackend(model, sel, gen, batch_size="auto", memory_limit=args.memory_limit, gpu=False)


async def _measure(path, model, sel, gen, engine, ks, args, roof) -> list[dict]:
    from hired_batch.bench import ideal
    from hired_batch.config import ColumnSpec
    from hired_batch.engine.dims import ModelDims
    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
    from hired_batch.job.ask import parse_asks
    from hired_batch.job.stages import GenerateStage, PreprocessStage

    images = [image_to_bytes(make_synthetic_image(w, h, i)) for i, (h, w) in enumerate(SIZES * args.images)]
    images = images[: args.images]

    def batch(table):
        return {k: _column(table.column(k).to_pylist()) for k in table.column_names}

    same = args.same or args.engine == "vllm"
    rows = []
    for k in ks:
        asks = parse_asks([f"q{j}={QUESTIONS[j % len(QUESTIONS)]}" for j in range(k)])
        ask_pre = PreprocessStage(path, ColumnSpec(question_column=None, ask=asks), engine=model.engine)
        ask_batch = batch(ask_pre({"id": _column([f"i{i}" for i in range(len(images))]), "image": _column(images)}))
        sep_pre = PreprocessStage(path, ColumnSpec(), engine=model.engine)
        sep_batch = batch(sep_pre(_separate(images, asks, distinct=True)))
        same_batch = batch(sep_pre(_separate(images, asks, distinct=False))) if same else None
        asked = GenerateStage(model, sel, gen, engine=engine, asks=asks)
        alone = GenerateStage(model, sel, gen, engine=engine)
        if not rows:  # warm-up: first calls allocate and compile
            await alone.answer(sep_batch)
        t_sep = min([await _timed(alone, sep_batch) for _ in range(args.repeats)])
        t_ask = min([await _timed(asked, ask_batch) for _ in range(args.repeats)])
        t_same = min([await _timed(alone, same_batch) for _ in range(args.repeats)]) if same else None
        dims = ModelDims.from_hf(_config(path))
        runner = asked.runner
        items = [
            runner.planned_item((int(h), int(w)), len(ids) // 8)
            for h, w, ids in zip(ask_batch["image_h"], ask_batch["image_w"], ask_batch["input_ids"])
        ]
        n_question = _tokens_after_image(ask_batch["input_ids"][0], path)
        predicted = ideal.ask_saving(dims, items, n_question, k, gen.max_new_tokens, roof)
        saving = 1 - t_ask / t_sep
        rows.append(
            dict(
                k=k,
                separate_s=t_sep,
                ask_s=t_ask,
                same_s=t_same,
                saving=saving,
                ideal=predicted,
                ratio=saving / predicted if predicted > 0 else float("nan"),
            )
        )
    return rows


def _column(values):
    """An object column as Ray Data's numpy batches hold one."""
    import numpy as np

    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _separate(images: list[bytes], asks, distinct: bool) -> dict:
    """The k separate rows of each image (id, image, question columns); ``distinct``: each
    question gets its own copy of the image, one pixel changed, so no cache can share it."""
    ids, ims, qs = [], [], []
    for i, im in enumerate(images):
        for j, a in enumerate(asks):
            ids.append(f"i{i}/{a.name}")
            ims.append(_nudged(im, j) if distinct and j else im)
            qs.append(a.question)
    return {"id": _column(ids), "image": _column(ims), "question": _column(qs)}


def _nudged(png: bytes, j: int) -> bytes:
    """``png`` with its top-left pixel set from ``j``: the same size and tokens, another hash."""
    import io

    from PIL import Image

    from hired_batch.engine.inputs import image_to_bytes

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.putpixel((0, 0), ((37 * j) % 256, (91 * j) % 256, (13 * j) % 256))
    return image_to_bytes(im)


async def _timed(stage, batch) -> float:
    await _cold(stage.runner)
    t0 = time.perf_counter()
    out = await stage.answer(batch)
    errors = [e for e in out.column("error").to_pylist() if e]
    if errors:
        raise RuntimeError(f"bench rows failed: {errors[:3]}")
    return time.perf_counter() - t0


async def _cold(runner) -> None:
    """Empty vLLM's prefix, encoder and multimodal caches: each timed call starts as a fresh
    job would (the bench asks the same images again, which the caches would serve)."""
    engine = getattr(runner, "engine", None)
    if hasattr(engine, "reset_prefix_cache"):  # vLLM's AsyncLLM (the HF engine keeps nothing between calls)
        await engine.reset_mm_cache()
        await engine.reset_encoder_cache()
        await engine.reset_prefix_cache()


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def _tokens_after_image(input_ids: bytes, path: str) -> int:
    """Prompt tokens after the image placeholder (the question and the template's tail)."""
    import numpy as np

    ids = np.frombuffer(input_ids, dtype=np.int64)
    image = _config(path).image_token_id
    return int(len(ids) - 1 - np.nonzero(ids == image)[0][-1])


if __name__ == "__main__":
    raise SystemExit(main())
