"""One HiRED engine (LLaVA-NeXT, budget 0.2 per engine): parity with our HF engine.

First-token log-probabilities (float32, greedy) must equal the HF engine's within
1e-4 at the engine's budget and at a per-request budget of 1.0; placeholders equal
the HF engine's kept counts; a batch of mixed sizes and budgets in one ``generate``
call gives each item what it gets alone.
"""

import numpy as np
import pytest
from conftest import NEXT, hf_engine, hf_first_logprobs, hired_overrides, picture, start_llm

TOL = 1e-4


@pytest.fixture(scope="module")
def llm(vllm_next):
    engine = start_llm(vllm_next, **hired_overrides(NEXT, selector="hired", budget=0.2))
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _request(ids, image, **options):
    req = {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
    if options:
        req["mm_processor_kwargs"] = {f"hired_{k}": v for k, v in options.items()}
    return req


def _first(llm, requests):
    from vllm import SamplingParams

    return llm.generate(requests, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)


def _assert_same_first_token(out, n_text, kept, hf_logprobs):
    assert len(out.prompt_token_ids) == n_text - 1 + kept  # <image> became `kept` placeholders
    top = out.outputs[0].logprobs[0]
    assert out.outputs[0].token_ids[0] == int(hf_logprobs.argmax())
    for token, lp in top.items():
        assert abs(lp.logprob - float(hf_logprobs[token])) < TOL, (token, lp.logprob, float(hf_logprobs[token]))


@pytest.mark.parametrize("budget", [0.2, 1.0])
def test_first_token_logprobs_equal_the_hf_engine(llm, vllm_next, budget):
    hf = hf_engine(vllm_next, selector="hired", budget=budget)
    image = picture(500, 333, seed=1)
    ids, kept, hf_lp = hf_first_logprobs(hf, image)
    options = {} if budget == 0.2 else {"budget": budget}  # 0.2: the engine's own; 1.0: per request
    (out,) = _first(llm, [_request(ids, image, **options)])
    _assert_same_first_token(out, len(ids), kept, hf_lp)


def test_mixed_batch_of_sizes_and_budgets(llm, vllm_next):
    items = [
        ((672, 336), dict(budget=0.1)),
        ((300, 1000), {}),
        ((120, 100), dict(budget_tokens=50)),
        ((600, 600), dict(budget=0.5, alpha=0.8)),
        ((672, 336), dict(budget=0.5)),
    ]
    expected, requests = [], []
    for i, ((w, h), opts) in enumerate(items):
        image = picture(w, h, seed=10 + i % 4)  # items 0 and 4: one image, two budgets
        hf = hf_engine(vllm_next, selector="hired", **{"budget": 0.2, **opts})
        ids, kept, hf_lp = hf_first_logprobs(hf, image)
        expected.append((len(ids), kept, hf_lp))
        requests.append(_request(ids, image, **opts))
    outs = _first(llm, requests)  # one generate call: one scheduler batch
    for out, (n_text, kept, hf_lp) in zip(outs, expected):
        _assert_same_first_token(out, n_text, kept, hf_lp)
    # one image at two budgets: the multimodal cache keys it by its options (a hit on
    # item 0's entry would give item 4 item 0's placeholders and features)
    assert len(outs[0].prompt_token_ids) != len(outs[4].prompt_token_ids)


def test_bad_request_budget_is_refused_and_the_engine_keeps_serving(llm, vllm_next):
    image = picture(300, 200)
    ids, kept, hf_lp = hf_first_logprobs(hf_engine(vllm_next, selector="hired", budget=0.2), image)
    with pytest.raises(ValueError, match="budget must be a fraction"):
        _first(llm, [_request(ids, image, budget=3.0)])
    (out,) = _first(llm, [_request(ids, image)])
    _assert_same_first_token(out, len(ids), kept, hf_lp)


def test_the_lean_handoff_answers_as_the_decoded_image_on_every_grid(llm, vllm_next):
    """What the vLLM backend's generation actor rebuilds from the handoff (the encoded
    bytes, ``handoff.decode``) gives the greedy answers of the decoded image the CPU
    stage handed over before (float32), for one image per anyres grid."""
    from PIL import Image
    from vllm import SamplingParams

    from hired_batch.engine import handoff
    from hired_batch.engine.inputs import decode_image, image_to_bytes
    from hired_batch.engine.vllm.backend import encode
    from hired_batch.engine.weights import Preprocessor

    pre = Preprocessor.from_pretrained(str(vllm_next))
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    lean, before = [], []
    for i, (w, h) in enumerate([(672, 336), (336, 672), (1216, 684), (1008, 336), (336, 1008)]):
        file = image_to_bytes(picture(w, h, seed=20 + i))
        image, err = decode_image(file)
        assert err is None
        row = encode(pre, image, "What is this?")
        ids = np.frombuffer(row["input_ids"], dtype=np.int64).tolist()
        assert row["image"] == file  # the file's bytes, not the decoded pixels
        lean.append(_request(ids, handoff.decode(row["image"])))
        before.append(_request(ids, Image.frombytes("RGB", (w, h), np.asarray(image).tobytes())))
    got = llm.generate(lean, greedy, use_tqdm=False)
    want = llm.generate(before, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [len(o.prompt_token_ids) for o in got] == [len(o.prompt_token_ids) for o in want]
