"""``hired_selector: full`` in the plugin equals stock vLLM: two engines, one after the other.

Same prompts, same first-token log-probabilities (float32, greedy) and prompt lengths
from vLLM's own LLaVA-NeXT and from the plugin's architecture with every token kept;
both also equal our HF engine's ``full`` within 1e-4. The checkpoint names its CLIP
weights as hub checkpoints do (stock vLLM cannot load transformers 5 names), so this
also shows the plugin loading hub-style names unchanged.
"""

from conftest import NEXT, SIZES, hf_engine, hf_first_logprobs, hired_overrides, picture, start_llm

TOL = 1e-4


def _first_tokens(path, requests, **overrides):
    from vllm import SamplingParams

    llm = start_llm(path, **overrides)
    try:
        outs = llm.generate(requests, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)
        return [
            (
                len(o.prompt_token_ids),
                o.outputs[0].token_ids[0],
                {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()},
            )
            for o in outs
        ]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_full_selector_equals_stock_vllm_and_the_hf_engine(vllm_next, vllm_next_hub_names):
    hf = hf_engine(vllm_next, selector="full")  # same weights, transformers 5 names
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:4])]
    refs = [hf_first_logprobs(hf, im) for im in images]
    requests = [{"prompt_token_ids": ids, "multi_modal_data": {"image": im}} for (ids, _, _), im in zip(refs, images)]
    stock = _first_tokens(vllm_next_hub_names, requests)
    full = _first_tokens(vllm_next_hub_names, requests, **hired_overrides(NEXT, selector="full"))
    for s, f, (ids, kept, hf_lp) in zip(stock, full, refs):
        assert s[0] == f[0] == len(ids) - 1 + kept
        assert s[1] == f[1] == int(hf_lp.argmax())
        assert s[2].keys() == f[2].keys()
        for token, lp in s[2].items():
            assert abs(lp - f[2][token]) < TOL and abs(lp - float(hf_lp[token])) < TOL
