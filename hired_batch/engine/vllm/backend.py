"""The vLLM engine with the HiRED plugin, as a generation backend (no Ray here).

``VllmBackend`` holds one ``AsyncLLM`` (vLLM's asynchronous engine) built from our
configuration by ``options.engine_kwargs``. Callers submit one request per row with
``await backend.answer(...)``, from as many coroutines as they like; the backend seam's
``generate(rows)`` submits a Ray batch's rows so. vLLM's scheduler batches whatever is in
flight (continuous batching), so a row never waits for a longer answer of its batch and
a new row joins as soon as there is room; the job keeps ``BATCHES_IN_FLIGHT`` Ray
batches in flight per actor for that (the ``Backend`` registered below declares it).

Handoff: the image's encoded bytes (``handoff.encoded``, decoded again in the generation
actor) and the prompt ids; vLLM's processor makes the pixels.

Rows that share an image (``backends.SHARE``: several questions asked of it) are sent so
that vLLM's caches serve the later ones: the first question goes alone and the others
follow once its prompt is prefilled (its first token), so they find the image's prefix
(system prompt + image tokens) in the prefix cache, and the vision tower, keyed by the
image's multimodal hash, does not run again. Every request carries a ``cache_salt``
naming the HiRED options, so two selections never share cached blocks.

Per-request timings come from vLLM's request metrics (its engine core's clock), so they
are per item, unlike the HF engine's per-batch timings (``ITEM_TIMING``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine import backends, constraints, handoff, token_plan
from hired_batch.engine.generation_rules import sampling_kwargs, stop_cut
from hired_batch.engine.vllm.options import check_cpu_head_size, engine_kwargs

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


class ConstraintCut(Exception):
    """A constrained answer the token limit cut (its text: the row's error)."""


def structured_outputs_args() -> dict:
    """``AsyncEngineArgs`` keywords that make xgrammar vLLM's structured-output backend
    (``constraints.VLLM_BACKEND``, as the HF engine's), never another one chosen by vLLM."""
    from vllm.config import StructuredOutputsConfig

    cfg = StructuredOutputsConfig(backend=constraints.VLLM_BACKEND, disable_any_whitespace=True)  # JSON_SEPARATORS
    return {"structured_outputs_config": cfg}


def sampling_params(generation: GenerationConfig):
    """vLLM's ``SamplingParams`` for our options (``sampling_kwargs``), a constraint as its
    ``StructuredOutputsParams``."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kw = sampling_kwargs(generation)
    if "structured_outputs" in kw:
        kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
    return SamplingParams(**kw)


class VllmBackend:
    """One vLLM engine with HiRED; ``generate`` is a coroutine per request."""

    def __init__(
        self,
        model: ModelConfig,
        selection: SelectionConfig,
        generation: GenerationConfig,
        *,
        batch_size="auto",
        memory_limit: str | None = None,
        tensor_parallel_size: int = 1,
        gpu: bool | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine import async_llm
        from vllm.v1.engine.async_llm import AsyncLLM

        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        cfg = AutoConfig.from_pretrained(model.path, trust_remote_code=False)
        self.kwargs = engine_kwargs(
            model,
            selection,
            model_type=cfg.model_type,
            batch_size=batch_size,
            memory_limit=memory_limit,
            tensor_parallel_size=tensor_parallel_size,
            gpu=gpu,
        )
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.kwargs, **structured_outputs_args()))
        async_llm.logger.addFilter(self._log_unless_idle_end)
        self.sampling = sampling_params(generation)
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
        self.selection = selection
        self.geometry = token_plan.Geometry.from_config(cfg)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.max_positions = self.max_model_len  # backends.Runner
        self.max_new_tokens = generation.max_new_tokens
        self.generation = generation
        self.cache_salt = cache_salt(selection)
        self._calls = 0
        self._ids = itertools.count()

    def planned_item(self, image_size, n_prompt_ids: int):
        """``token_plan.item_tokens`` of one row: the counts the plugin will use."""
        return token_plan.item_tokens(image_size, self.selection, self.geometry, n_prompt_ids)

    def full_count(self, image_size) -> int:
        """Visual tokens stock LLaVA would send for the image."""
        return token_plan.full_count(image_size, self.geometry)

    async def generate(self, rows: list[dict]) -> list[dict]:
        """``backends.Runner.generate``: one request per row, all in flight at once. A row
        vLLM refuses (its processor rejects the image, or anything else it raises for that
        request) gets an error; a dead engine raises ``backends.EngineDead``."""
        self._calls += 1
        gates = {}  # share key -> set once the image's first question is prefilled
        images = {}  # share key -> the image's one decode, awaited by each of its questions
        requests = []
        for r in rows:
            key = r.get(backends.SHARE)
            if key is None:
                requests.append(self._row(r))
            elif key not in gates:
                gates[key] = asyncio.Event()
                images[key] = asyncio.ensure_future(_decoded(r))
                requests.append(self._row(r, gates[key], images[key]))
            else:
                requests.append(self._after(gates[key], r, images[key]))
        answers = await asyncio.gather(*requests, return_exceptions=True)
        return [self._result(r, a, len(rows)) for r, a in zip(rows, answers)]

    async def _after(self, gate: asyncio.Event, row: dict, image) -> Answer:
        """A later question of an image: sent once the first one's prompt is in the prefix cache."""
        await gate.wait()
        return await self._row(row, image=image)

    async def _row(self, row: dict, prefilled: asyncio.Event | None = None, image=None) -> Answer:
        """One request; ``image``: the shared decode of the row's image (a future), else decoded here."""
        image = await (image if image is not None else _decoded(row))
        ids = np.frombuffer(row["input_ids"], dtype=np.int64).tolist()
        return await self.answer(ids, image, row.get("generation"), prefilled=prefilled)

    def _result(self, row: dict, a, n: int) -> dict:
        if isinstance(a, ConstraintCut):
            return dict(error=str(a))
        if isinstance(a, BaseException):
            return dict(error=self._refused(a))
        return dict(
            answer=a.answer,
            n_prompt_tokens=a.n_prompt_tokens,
            n_generated_tokens=a.n_generated_tokens,
            n_visual_tokens_kept=row["item"].n_visual,
            n_visual_tokens_full=self.full_count((int(row["image_h"]), int(row["image_w"]))),
            call=self._calls,
            batch_size=n,
            t_prefill_s=a.t_prefill_s,
            t_decode_s=a.t_decode_s,
            t_batch_s=a.t_request_s,
        )

    @staticmethod
    def _refused(exc: BaseException) -> str:
        """The error text of a request vLLM refused; a dead engine or a cancelled call is
        no row's fault: ``EngineDead`` (the job restarts the actor) or the exception propagates."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            raise backends.EngineDead(str(exc)) from exc
        if not isinstance(exc, Exception):
            raise exc  # cancellation, KeyboardInterrupt: not a row's fault
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return f"image: vLLM refused the request: {type(exc).__name__}: {first}"

    async def answer(
        self, prompt_ids: list[int], image, generation: GenerationConfig | None = None, prefilled=None
    ) -> Answer:
        """Answer one prompt (token ids with one ``<image>``) about one PIL image.

        Raises what vLLM raises for a request it refuses (e.g. an image its processor
        cannot take); the engine keeps serving the other requests. ``generation``: this
        request's options in place of the backend's (one ``SamplingParams`` per request).
        ``prefilled``: an ``asyncio.Event`` set at the first token (or when the request ends).
        """
        try:
            return await self._answer(prompt_ids, image, generation, prefilled)
        finally:
            if prefilled is not None:
                prefilled.set()  # a refused request lets its image's other questions go too

    async def _answer(self, prompt_ids, image, generation, prefilled) -> Answer:
        g = generation or self.generation
        sampling = self.sampling if generation is None else sampling_params(generation)
        t0 = time.perf_counter()
        request = {
            "prompt_token_ids": list(prompt_ids),
            "multi_modal_data": {"image": image},
            "cache_salt": self.cache_salt,
        }
        final = None
        async for out in self.engine.generate(request, sampling, request_id=f"hired-{next(self._ids)}"):
            final = out
            if prefilled is not None:
                prefilled.set()
        t_request = time.perf_counter() - t0
        done = final.outputs[0]
        m = final.metrics  # RequestStateStats: engine-core timestamps (monotonic) + front-end latency
        if g.constrained and done.finish_reason == "length":  # the grammar did not reach its end
            raise ConstraintCut(constraints.cut_error(g.max_new_tokens))
        return Answer(
            answer=self._answer_text(done, g),
            n_prompt_tokens=len(final.prompt_token_ids),
            n_generated_tokens=len(done.token_ids),
            t_prefill_s=float(m.first_token_latency),
            t_decode_s=float(m.last_token_ts - m.first_token_ts),
            t_request_s=t_request,
        )

    def _answer_text(self, done, g: GenerationConfig) -> str:
        """The answer as the HF engine gives it: the generated ids decoded (special tokens
        skipped), cut before the stop string vLLM stopped at (``done.stop_reason``) by the
        one stop rule both engines share (``stop_cut``), stripped."""
        text = self.tokenizer.decode(done.token_ids, skip_special_tokens=True)
        if isinstance(done.stop_reason, str):
            n_min = g.min_new_tokens
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


async def _decoded(row: dict):
    """The pixels the CPU stage decoded, from the row's encoded image; in a thread, so a large
    image does not hold the event loop."""
    return await asyncio.to_thread(handoff.decode, row["image"])


def cache_salt(selection: SelectionConfig) -> str:
    """vLLM's ``cache_salt`` for requests under ``selection``: a digest of the HiRED options,
    so cached KV blocks are shared only between requests that pruned their images alike."""
    import hashlib

    return hashlib.sha256(repr(selection).encode()).hexdigest()[:16]


def encode(pre, image, question) -> dict:
    """One row's handoff: prompt ids and the image's encoded bytes (``handoff.encoded``;
    the generation actor decodes them, vLLM's processor makes the pixels)."""
    return dict(
        input_ids=pre.prompt_ids(question).tobytes(),
        image=handoff.encoded(image),
        image_h=image.height,
        image_w=image.width,
    )


def start(
    model, selection, generation, *, batch_size="auto", memory_limit=None, tensor_parallel_size=1, engine=None
) -> VllmBackend:
    """``Backend.start``: one engine per actor (or ``engine``, already started)."""
    return engine or VllmBackend(
        model,
        selection,
        generation,
        batch_size=batch_size,
        memory_limit=memory_limit,
        tensor_parallel_size=tensor_parallel_size,
    )


# Ray batches each generation actor runs at once. With batch_size rows per Ray batch and
# the engine running up to batch_size sequences, the next batches' rows wait in vLLM's
# queue and fill each slot as soon as an answer ends.
BATCHES_IN_FLIGHT = 4

BACKEND = backends.register(
    backends.Backend(
        name="vllm",
        encode=encode,
        start=start,
        batches_in_flight=BATCHES_IN_FLIGHT,
        check_on_cpu=check_cpu_head_size,
        handoff={"image": pa.binary()},  # handoff.encoded: the image's file bytes (or a lossless PNG)
    )
)
