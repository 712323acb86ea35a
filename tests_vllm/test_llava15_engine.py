"""One HiRED LLaVA-1.5 engine (transformers 5 checkpoint, head_dim 32): parity with our HF engine.

Loading it at all checks the weight-name mapping (CLIP saved by transformers 5 as
``vision_tower.embeddings...``); the first-token log-probabilities check the rest.
"""

from conftest import LLAVA, hf_engine, hf_first_logprobs, hired_overrides, picture, start_llm

TOL = 1e-4


def test_llava15_first_token_logprobs_equal_the_hf_engine(vllm_llava):
    from vllm import SamplingParams

    images = [picture(500, 333, seed=3), picture(200, 400, seed=4)]
    budgets = [0.2, 0.6]
    refs = [hf_first_logprobs(hf_engine(vllm_llava, selector="hired", budget=b), im) for b, im in zip(budgets, images)]
    llm = start_llm(vllm_llava, **hired_overrides(LLAVA, selector="hired", budget=0.2))
    try:
        requests = [
            {"prompt_token_ids": refs[0][0], "multi_modal_data": {"image": images[0]}},
            {
                "prompt_token_ids": refs[1][0],
                "multi_modal_data": {"image": images[1]},
                "mm_processor_kwargs": {"hired_budget": 0.6},
            },
        ]
        outs = llm.generate(requests, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    for out, (ids, kept, hf_lp), b in zip(outs, refs, budgets):
        assert kept == round(b * 576)
        assert len(out.prompt_token_ids) == len(ids) - 1 + kept
        assert out.outputs[0].token_ids[0] == int(hf_lp.argmax())
        for token, lp in out.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - float(hf_lp[token])) < TOL
