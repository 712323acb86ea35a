"""Constrained answers mean the same on both engines: with a JSON schema, a label set and a
regex, vLLM (the job's ``VllmBackend``, xgrammar backend) answers what the HF engine
answers, greedy, float32, at HiRED 0.2 and 1.0 (two engine starts, ~1-2 min each); every
ok answer is valid, and an answer the token limit cuts is the same error row."""

import asyncio
import json
import re

import pytest
from conftest import hf_engine, picture

from hired_batch.bench import constraint_cost

SIZES = [(672, 336), (500, 333), (336, 672), (600, 600)]
QUESTIONS = ["Describe the scene as JSON.", "Indoor or outdoor?", "How many?"]
SCHEMA = constraint_cost.SCHEMA  # the bench's record: a nested object, an enum, integers, a boolean, an array
LABELS = ("indoor", "outdoor", "not sure")
PATTERN = r"[0-9]{1,3} (cats|dogs)"


def constraints():
    from hired_batch.config import GenerationConfig

    return {
        "json": GenerationConfig(max_new_tokens=120, json_schema=json.dumps(SCHEMA)),
        "choice": GenerationConfig(max_new_tokens=12, choices=LABELS),
        "regex": GenerationConfig(max_new_tokens=16, regex=PATTERN),
        "cut": GenerationConfig(max_new_tokens=4, json_schema=json.dumps(SCHEMA)),
    }


def hf_rows(engine, images, generation):
    from hired_batch.engine.constraints import cut_error

    out = []
    for im, q in zip(images, QUESTIONS * 2):
        engine.generation = generation
        item = engine.generate([im], [q]).items[0]
        out.append((item["answer"], item.get("error")))
    assert all(e in (None, cut_error(generation.max_new_tokens)) for _, e in out)
    return out


def vllm_rows(backend, engine, images, generation):
    """The job's path: handoff rows through the backend seam, each with the options."""
    from hired_batch.engine.vllm.backend import encode

    rows = []
    for im, q in zip(images, QUESTIONS * 2):
        row = encode(engine.pre, im, q)
        row["item"] = backend.planned_item((row["image_h"], row["image_w"]), len(row["input_ids"]) // 8)
        row["generation"] = generation
        rows.append(row)
    return rows


@pytest.mark.parametrize("budget", [0.2, 1.0])
def test_constrained_answers_equal_the_hf_engines_and_are_valid(vllm_next, budget):
    import jsonschema

    from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
    from hired_batch.engine.constraints import cut_error
    from hired_batch.engine.vllm.backend import VllmBackend

    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    engine = hf_engine(vllm_next, selector="hired", budget=budget)
    hf = {k: hf_rows(engine, images, g) for k, g in constraints().items()}

    backend = VllmBackend(
        ModelConfig(str(vllm_next), dtype="float32", device="cpu"),
        SelectionConfig(selector="hired", budget=budget),
        GenerationConfig(max_new_tokens=8),
        batch_size=8,
        memory_limit="256MB",
        gpu=False,
    )
    try:

        async def answer_all():
            return {k: await backend.generate(vllm_rows(backend, engine, images, g)) for k, g in constraints().items()}

        got = asyncio.run(answer_all())  # one event loop: the engine's output handler lives on it
    finally:
        backend.shutdown()
    for kind, rows in got.items():
        assert [(r.get("answer"), r.get("error")) for r in rows] == hf[kind], kind
    ok = {k: [a for a, e in hf[k] if e is None] for k in hf}
    assert ok["json"] and ok["choice"] and ok["regex"], ok
    for a in ok["json"]:
        jsonschema.validate(json.loads(a), SCHEMA)
    assert all(a in LABELS for a in ok["choice"])
    assert all(re.fullmatch(PATTERN, a) for a in ok["regex"])
    assert hf["cut"] == [(None, cut_error(4))] * len(images)  # 4 tokens never close the object
