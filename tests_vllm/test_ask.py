"""Many questions per image on the vLLM engine (one engine start): ``--ask`` with three
named questions (one with its own answer length) on 20 images gives one row per image
whose answers equal the same questions asked as separate rows and the HF engine's
(greedy, float32); the vision tower runs once per image (the prefix cache and the
encoder cache, keyed by the image, serve its later questions)."""

import asyncio
import os

from support.ask_rows import ASKS, ask_batch, separate_batch, vision_runs
from support.images import noise_images

SIZES = [(40 + 7 * i, 90 - 3 * i) for i in range(20)]  # (h, w), as tests/test_ask.py


def test_ask_on_vllm_encodes_each_image_once_and_answers_as_separate_rows_and_hf(vllm_next, tmp_path):
    from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
    from hired_batch.engine.hf import HiredEngine
    from hired_batch.engine.inputs import image_to_bytes
    from hired_batch.engine.vision import VISION_LOG_ENV
    from hired_batch.engine.vllm.backend import VllmBackend
    from hired_batch.job.stages import GenerateStage

    log = tmp_path / "vision.log"
    os.environ[VISION_LOG_ENV] = str(log)  # before the engine core process starts: it inherits it
    sel, gen = SelectionConfig(budget_tokens=32), GenerationConfig(max_new_tokens=5)
    model = ModelConfig(str(vllm_next), dtype="float32", device="cpu", engine="vllm")
    imgs = [image_to_bytes(im) for im in noise_images(SIZES)]
    backend = VllmBackend(model, sel, gen, batch_size=8, memory_limit="256MB", gpu=False)
    try:
        asked = GenerateStage(model, sel, gen, engine=backend, asks=ASKS)
        alone = GenerateStage(model, sel, gen, engine=backend)

        async def both():
            log.unlink(missing_ok=True)  # the engine's start-up profiling ran the tower on dummy images
            out = (await asked.answer(ask_batch(vllm_next, imgs, engine="vllm"))).to_pylist()
            runs = vision_runs(log)
            return out, runs, (await alone.answer(separate_batch(vllm_next, imgs, engine="vllm"))).to_pylist()

        out, runs, separate = asyncio.run(both())  # one event loop: the engine's output handler lives on it
    finally:
        backend.shutdown()
        os.environ.pop(VISION_LOG_ENV, None)
    assert sum(runs) == 20, f"vision tower runs per call {runs}: expected each of the 20 images once"
    by_id = {r["id"]: r for r in separate}
    assert [r["id"] for r in out] == [f"img{i}" for i in range(20)]
    for r in out:
        assert r["error"] is None
        for a in ASKS:
            assert r[f"answer_{a.name}"] == by_id[f"{r['id']}/{a.name}"]["answer"]
            assert r[f"n_generated_tokens_{a.name}"] == by_id[f"{r['id']}/{a.name}"]["n_generated_tokens"]
        assert r["n_generated_tokens_count"] <= 3
        assert r["answer_place"] in ("indoor", "outdoor")  # its own constraint, on vLLM's xgrammar backend
    engine = HiredEngine.load(ModelConfig(str(vllm_next), dtype="float32", device="cpu"), sel, gen)
    hf = GenerateStage(ModelConfig(str(vllm_next), dtype="float32"), sel, gen, engine=engine, asks=ASKS)
    hf_out = hf.table(ask_batch(vllm_next, imgs)).to_pylist()
    for a in ASKS:
        assert [r[f"answer_{a.name}"] for r in out] == [r[f"answer_{a.name}"] for r in hf_out]
