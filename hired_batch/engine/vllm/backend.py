"""The vLLM engine with the HiRED plugin, as a generation backend (no Ray here).

``VllmBackend`` holds one ``AsyncLLM`` (vLLM's asynchronous engine) built from our
configuration by ``options.engine_kwargs``. Callers submit one request per row with
``await backend.generate(...)``, from as many coroutines as they like: vLLM's
scheduler batches whatever is in flight (continuous batching), so a row never waits for
a longer answer of its batch and a new row joins as soon as there is room.

Per-request timings come from vLLM's request metrics (its engine core's clock), so they
are per item, unlike the HF engine's per-batch timings (``ITEM_TIMING``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine import token_plan
from hired_batch.engine.generation_rules import sampling_kwargs, stop_cut
from hired_batch.engine.vllm.options import engine_kwargs

# What each timing of ``Answer`` measures (docs/engines.md: "Timing columns per engine").
ITEM_TIMING = {
    "t_prefill_s": "vLLM's time to first token: from the request's arrival (its multimodal "
                   "processing, queueing, vision tower and prefill)",
    "t_decode_s": "from the first token to the last",
    "t_request_s": "the request's wall time as the caller awaited it",
}


@dataclass(frozen=True)
class Answer:
    """One finished request."""

    answer: str  # decoded as the HF engine decodes (special tokens skipped, stripped)
    n_prompt_tokens: int  # text plus visual placeholders, as the engine ran it
    n_generated_tokens: int  # tokens generated, EOS included
    t_prefill_s: float  # per item, ITEM_TIMING
    t_decode_s: float  # per item
    t_request_s: float  # per item


class VllmBackend:
    """One vLLM engine with HiRED; ``generate`` is a coroutine per request."""

    def __init__(self, model: ModelConfig, selection: SelectionConfig, generation: GenerationConfig, *,
                 batch_size="auto", memory_limit: str | None = None, tensor_parallel_size: int = 1,
                 gpu: bool | None = None):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine import async_llm
        from vllm.v1.engine.async_llm import AsyncLLM

        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        cfg = AutoConfig.from_pretrained(model.path, trust_remote_code=False)
        self.kwargs = engine_kwargs(model, selection, model_type=cfg.model_type, batch_size=batch_size,
                                    memory_limit=memory_limit, tensor_parallel_size=tensor_parallel_size, gpu=gpu)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.kwargs))
        async_llm.logger.addFilter(self._log_unless_idle_end)
        self.sampling = SamplingParams(**sampling_kwargs(generation))
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
        self.selection = selection
        self.geometry = token_plan.Geometry.from_config(cfg)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.generation = generation
        self._ids = itertools.count()

    def planned_item(self, image_size, n_prompt_ids: int):
        """``token_plan.item_tokens`` of one row: the counts the plugin will use."""
        return token_plan.item_tokens(image_size, self.selection, self.geometry, n_prompt_ids)

    def full_count(self, image_size) -> int:
        """Visual tokens stock LLaVA would send for the image."""
        return token_plan.full_count(image_size, self.geometry)

    async def generate(self, prompt_ids: list[int], image) -> Answer:
        """Answer one prompt (token ids with one ``<image>``) about one PIL image.

        Raises what vLLM raises for a request it refuses (e.g. an image its processor
        cannot take); the engine keeps serving the other requests.
        """
        t0 = time.perf_counter()
        request = {"prompt_token_ids": list(prompt_ids), "multi_modal_data": {"image": image}}
        final = None
        async for out in self.engine.generate(request, self.sampling, request_id=f"hired-{next(self._ids)}"):
            final = out
        t_request = time.perf_counter() - t0
        done = final.outputs[0]
        m = final.metrics  # RequestStateStats: engine-core timestamps (monotonic) + front-end latency
        return Answer(answer=self._answer_text(done),
                      n_prompt_tokens=len(final.prompt_token_ids), n_generated_tokens=len(done.token_ids),
                      t_prefill_s=float(m.first_token_latency), t_decode_s=float(m.last_token_ts - m.first_token_ts),
                      t_request_s=t_request)

    def _answer_text(self, done) -> str:
        """The answer as the HF engine gives it: the generated ids decoded (special tokens
        skipped), cut before the stop string vLLM stopped at (``done.stop_reason``) by the
        one stop rule both engines share (``stop_cut``), stripped."""
        text = self.tokenizer.decode(done.token_ids, skip_special_tokens=True)
        if isinstance(done.stop_reason, str):
            n_min = self.generation.min_new_tokens
            after = len(self.tokenizer.decode(done.token_ids[:n_min], skip_special_tokens=True)) if n_min else 0
            cut = stop_cut(text, (done.stop_reason,), after)
            text = text if cut is None else text[:cut]
        return text.strip()

    def shutdown(self) -> None:
        """Stop the engine core process."""
        self.engine.shutdown()

    def _log_unless_idle_end(self, record) -> bool:
        """Logging filter on AsyncLLM's logger: its "output_handler failed" while no request
        is in flight is the engine core ending before this process (at the end of a job Ray
        stops the actor's child processes first). No row failed, so it is not logged; a
        request that finds the engine dead raises EngineDeadError as before."""
        if not str(record.msg).startswith("AsyncLLM output_handler failed"):
            return True
        return self.engine.get_num_unfinished_requests() > 0
