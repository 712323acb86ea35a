"""What a constraint costs: ``--json-schema`` and ``--choice`` against unconstrained answers
of the same length, per engine and workload (``python -m hired_batch.bench.constraint_cost``).

Random weights never end an unconstrained answer, while a grammar ends its answer as soon
as it is complete; items/s of answers of different lengths would measure the lengths, not
the grammar. So each constrained run is timed first and its baseline decodes exactly as
many tokens (HF: per batch, the batch's longest constrained answer, which is what a
batch decodes anyway; vLLM: per request, ``min_tokens = max_tokens`` = that answer's
length). The ratio of items/s is then the grammar's own cost: compiling (cached after the
first batch), the matcher's mask each step and applying it. One warm-up pass, then
``--repeats`` timed passes, the median reported. Not a test: run once, by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from hired_batch.bench.workload import CAPTIONS, QUESTIONS, workload
from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig

SCHEMA = {  # the short workload's record: a nested object, an enum, integers, a boolean, an array
    "type": "object",
    "properties": {
        "place": {
            "type": "object",
            "properties": {
                "kind": {"type": "string", "enum": ["indoor", "outdoor"]},
                "rooms": {"type": "integer", "minimum": 0, "maximum": 20},
            },
            "required": ["kind", "rooms"],
            "additionalProperties": False,
        },
        "people": {"type": "integer", "minimum": 0, "maximum": 999},
        "busy": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "car"]}, "maxItems": 3},
    },
    "required": ["place", "people", "busy", "tags"],
    "additionalProperties": False,
}
LONG_SCHEMA = {  # the long workload's: free text fields, so answers run long
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 160},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["caption", "objects", "count"],
    "additionalProperties": False,
}
LABELS = ("indoor", "outdoor", "both", "not sure")
WORKLOADS = {  # name -> (questions, max_new_tokens, schema)
    "short": (QUESTIONS, 128, SCHEMA),
    "long": (CAPTIONS, 256, LONG_SCHEMA),
}


CONSTRAINTS = ("json-schema", "choice")


def constraints_of(workload: str, names=CONSTRAINTS) -> dict:
    """The constrained options of one workload: name -> GenerationConfig (``names`` of CONSTRAINTS)."""
    _, n, schema = WORKLOADS[workload]
    every = {
        "json-schema": GenerationConfig(max_new_tokens=n, json_schema=json.dumps(schema)),
        "choice": GenerationConfig(max_new_tokens=n, choices=LABELS),
    }
    return {k: every[k] for k in names}


def fixed(n: int) -> GenerationConfig:
    """Unconstrained, exactly n tokens."""
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


# --------------------------------------------------------------------------- HF


def hf_pass(engine, prepared, batch: int, gens) -> tuple[float, list[int]]:
    """Wall seconds and tokens per item of one pass; ``gens``: one GenerationConfig per batch."""
    t0 = time.perf_counter()
    tokens = []
    for b, g in zip(range(0, len(prepared), batch), gens):
        tokens += [i["n_generated_tokens"] for i in engine.generate_prepared(prepared[b : b + batch], g).items]
    return time.perf_counter() - t0, tokens


def run_hf(path, workloads, items: int, batch: int, repeats: int, names=CONSTRAINTS) -> list[dict]:
    from hired_batch.engine.hf import HiredEngine

    engine = HiredEngine.load(ModelConfig(str(path), dtype="float32", device="cpu"), SelectionConfig(budget=0.2))
    rows = []
    for w in workloads:
        qs = WORKLOADS[w][0]
        prepared = [engine.pre(im, q) for im, q in workload(items, questions=qs)]
        n_batches = (items + batch - 1) // batch
        for name, g in constraints_of(w, names).items():
            hf_pass(engine, prepared, batch, [g] * n_batches)  # warm-up: compiles the grammar once
            timed = [hf_pass(engine, prepared, batch, [g] * n_batches) for _ in range(repeats)]
            lengths = timed[0][1]
            longest = [max(lengths[b : b + batch]) for b in range(0, items, batch)]
            base = [hf_pass(engine, prepared, batch, [fixed(n) for n in longest]) for _ in range(repeats)]
            rows.append(_row("hf", w, name, items, lengths, [t for t, _ in timed], [t for t, _ in base]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- vLLM


def run_vllm(path, workloads, items: int, batch: int, repeats: int, names=CONSTRAINTS) -> list[dict]:
    from hired_batch.engine.vllm.backend import VllmBackend
    from hired_batch.engine.weights import Preprocessor

    backend = VllmBackend(
        ModelConfig(str(path), dtype="float32", device="cpu"),
        SelectionConfig(budget=0.2),
        GenerationConfig(),
        batch_size=batch,
        gpu=False,
    )
    pre = Preprocessor.from_pretrained(str(path))
    rows = []

    async def one_pass(pairs, gens):
        t0 = time.perf_counter()
        got = await asyncio.gather(
            *(backend.answer(pre.prompt_ids(q).tolist(), im, g) for (im, q), g in zip(pairs, gens))
        )
        return time.perf_counter() - t0, [a.n_generated_tokens for a in got]

    async def measure():
        for w in workloads:
            pairs = workload(items, questions=WORKLOADS[w][0])
            for name, g in constraints_of(w, names).items():
                await one_pass(pairs, [g] * items)  # warm-up
                timed = [await one_pass(pairs, [g] * items) for _ in range(repeats)]
                lengths = timed[0][1]
                base = [await one_pass(pairs, [fixed(n) for n in lengths]) for _ in range(repeats)]
                rows.append(_row("vllm", w, name, items, lengths, [t for t, _ in timed], [t for t, _ in base]))
                print(json.dumps(rows[-1]), flush=True)

    try:
        asyncio.run(measure())
    finally:
        backend.shutdown()
    return rows


# --------------------------------------------------------------------------- the mask alone


def mask_cost(path, workloads, batch: int, steps: int = 200) -> list[dict]:
    """xgrammar's own cost per decode step on the HF engine's path (``GrammarProcessor``:
    feed the last tokens, fill the masks, apply them) for a batch of random logits, the
    tokens drawn from the masked logits; and the schema's compile time. No model runs."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from hired_batch.engine import constraints

    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = max(AutoConfig.from_pretrained(str(path)).text_config.vocab_size, len(tok))  # the logits' width
    out = []
    for w in workloads:
        g = constraints_of(w, ("json-schema",))["json-schema"]
        c = constraints.of(g)
        grammars = constraints.Grammars(tok, vocab, {tok.eos_token_id})
        t0 = time.perf_counter()
        grammars.compile(c)
        compile_s = time.perf_counter() - t0
        proc = grammars.processor(c, batch)
        gen = torch.Generator().manual_seed(0)
        ids, spent, n = torch.zeros(batch, 0, dtype=torch.long), 0.0, 0
        for _ in range(steps):
            scores = torch.randn(batch, vocab, generator=gen)
            t0 = time.perf_counter()
            proc(ids, scores)
            spent += time.perf_counter() - t0
            n += 1
            probs = torch.softmax(scores, -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
            if all(m.is_terminated() for m in proc.matchers):
                break
        out.append(
            dict(workload=w, batch=batch, steps=n, mask_ms_per_step=1000 * spent / n, compile_ms=1000 * compile_s)
        )
        print(json.dumps(out[-1]), flush=True)
    return out


# --------------------------------------------------------------------------- report


def _row(engine, w, name, items, lengths, timed, base) -> dict:
    t, b = statistics.median(timed), statistics.median(base)
    return dict(
        engine=engine,
        workload=w,
        constraint=name,
        items=items,
        mean_tokens=sum(lengths) / len(lengths),
        items_s=items / t,
        base_items_s=items / b,
        cost_pct=100.0 * (1 - b / t),  # fewer items/s than unconstrained, in %
    )


def table(rows) -> str:
    out = [
        "| engine | workload | constraint | tokens / answer | items/s constrained | items/s unconstrained, same lengths | fewer items/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['engine']} | {r['workload']} | `--{r['constraint']}` | {r['mean_tokens']:.1f} | "
            f"{r['items_s']:.3f} | {r['base_items_s']:.3f} | {r['cost_pct']:.1f} % |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    from hired_batch.bench.model_sizes import ensure_checkpoint

    p = argparse.ArgumentParser(prog="python -m hired_batch.bench.constraint_cost", description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--workloads", default="short,long")
    p.add_argument("--preset", default="scaled")
    p.add_argument("--model", help="a checkpoint directory instead of --preset (with --mask-only: its tokenizer)")
    p.add_argument("--constraints", default=",".join(CONSTRAINTS), help="of " + ", ".join(CONSTRAINTS))
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write {'rows': [...]} here")
    p.add_argument("--mask-only", action="store_true", help="time xgrammar's mask per step alone (no model)")
    a = p.parse_args(argv)
    path = a.model or ensure_checkpoint(a.preset)
    workloads = a.workloads.split(",")
    if a.mask_only:
        mask_cost(path, workloads, a.batch_size)
        return 0
    rows = []
    for e in a.engines.split(","):
        run = run_hf if e == "hf" else run_vllm
        rows += run(path, workloads, a.items, a.batch_size, a.repeats, a.constraints.split(","))
    print(table(rows))
    if a.json:
        from hired_batch.jsonio import write_json

        write_json(a.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
