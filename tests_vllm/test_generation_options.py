"""The generation options mean the same on both engines: with a repetition penalty and
a stop string, vLLM (through the job's ``VllmBackend``) answers what the HF engine
answers, greedy, float32, HiRED at 0.2; per-row options through the backend seam
(one engine start: ~1-2 min on two cores)."""

import asyncio

from conftest import hf_engine, picture

QUESTION = "What is this?"
SIZES = [(672, 336), (500, 333), (336, 672)]


def hf_answers(engine, images, generation):
    engine.generation = generation
    return [engine.generate([im], [QUESTION]).items[0] for im in images]


def test_repetition_penalty_and_stop_strings_answer_as_on_the_hf_engine(vllm_next):
    from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
    from hired_batch.engine.vllm.backend import VllmBackend

    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    engine = hf_engine(vllm_next, selector="hired", budget=0.2)
    plain = hf_answers(engine, images, GenerationConfig(max_new_tokens=12, repetition_penalty=1.3))
    text = plain[0]["answer"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # ends the first answer half way
    assert stop.strip(), f"the first answer is too short to take a stop string from: {text!r}"
    generation = GenerationConfig(max_new_tokens=12, repetition_penalty=1.3, stop=(stop,))
    hf = hf_answers(engine, images, generation)
    assert hf[0]["answer"] == text[: text.find(stop)].strip()
    assert hf[0]["n_generated_tokens"] < plain[0]["n_generated_tokens"]

    backend = VllmBackend(
        ModelConfig(str(vllm_next), dtype="float32", device="cpu"),
        SelectionConfig(selector="hired", budget=0.2),
        generation,
        batch_size=4,
        memory_limit="256MB",
        gpu=False,
    )
    try:

        async def answer_all():
            ids = engine.pre.prompt_ids(QUESTION).tolist()
            answers = await asyncio.gather(*(backend.answer(ids, im) for im in images))
            return answers, await backend.generate(per_row_options(backend, engine, images[:2], generation))

        got, seam = asyncio.run(answer_all())  # one event loop: the engine's output handler lives on it
    finally:
        backend.shutdown()
    assert [g.answer for g in got] == [h["answer"] for h in hf]
    assert [g.n_generated_tokens for g in got] == [h["n_generated_tokens"] for h in hf]
    # through the backend seam, two rows of one batch with their own answer lengths
    assert [r["n_generated_tokens"] for r in seam] == [2, 5] and {r["batch_size"] for r in seam} == {2}


def per_row_options(backend, engine, images, generation) -> list[dict]:
    """Handoff rows as the generation stage gives them, each with its own options."""
    from dataclasses import replace

    from hired_batch.engine.vllm.backend import encode

    rows = []
    for im, n in zip(images, (2, 5)):
        row = encode(engine.pre, im, QUESTION)
        row["item"] = backend.planned_item((row["image_h"], row["image_w"]), len(row["input_ids"]) // 8)
        row["generation"] = replace(generation, max_new_tokens=n, min_new_tokens=n, stop=())
        rows.append(row)
    return rows
