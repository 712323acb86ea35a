"""One VisionZip engine (LLaVA-NeXT, budget 0.2 per engine): parity with our HF engine.

VisionZip sends new vectors (the CLS states and the merged contextual tokens), which the
plugin makes from the keys and CLS states it captures in vLLM's own CLIP. For every
anyres grid, and per-request budgets in one ``generate`` call: the placeholders equal the
token plan's count and the HF engine's, and the first-token log-probabilities equal the HF
engine's within HiRED's tolerance.
"""

from conftest import NEXT, hf_engine, hf_first_logprobs, hired_overrides, picture, start_llm
from test_engine import _assert_same_first_token, _first, _request

from hired_batch.engine import token_plan


def test_visionzip_every_grid_and_per_request_budgets_equal_the_hf_engine(vllm_next):
    llm = start_llm(vllm_next, **hired_overrides(NEXT, selector="visionzip", budget=0.2))
    try:
        items = [
            ((672, 336), {}),  # 1x2
            ((336, 672), dict(budget=0.1)),  # 2x1
            ((600, 600), dict(budget=0.5)),  # 2x2
            ((1000, 300), dict(budget_tokens=300)),  # 1x3
            ((300, 1000), {}),  # 3x1
            ((672, 336), dict(budget=0.5)),  # item 0's image at another budget
        ]
        expected, requests = [], []
        for i, ((w, h), opts) in enumerate(items):
            image = picture(w, h, seed=20 + i % 5)
            hf = hf_engine(vllm_next, selector="visionzip", **{"budget": 0.2, **opts})
            ids, kept, hf_lp = hf_first_logprobs(hf, image)
            assert kept == token_plan.visual_tokens((h, w), hf.selection, hf.geometry)  # plan == HF engine
            expected.append((len(ids), kept, hf_lp))
            requests.append(_request(ids, image, **opts))
        outs = _first(llm, requests)  # one generate call: one scheduler batch
        for out, (n_text, kept, hf_lp) in zip(outs, expected):
            _assert_same_first_token(out, n_text, kept, hf_lp)  # placeholders == HF engine's count
        assert len(outs[0].prompt_token_ids) != len(outs[5].prompt_token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()
