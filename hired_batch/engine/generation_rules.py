"""Generation rules with vLLM's meaning, shared by both backends (no Ray, no vLLM here).

Our ``GenerationConfig`` means what vLLM's ``SamplingParams`` means. The vLLM backend
passes it on (``sampling_kwargs``); the HF backend runs stock ``generate`` with the
same meaning (``hf_generate_kwargs``) plus what ``generate`` cannot do on
``inputs_embeds`` the vLLM way: the repetition penalty over prompt and answer
(``RepetitionPenalty``) and stop strings cut as vLLM cuts them (``StopStrings``,
``stop_cut``). The vLLM backend uses ``stop_cut`` too, so both engines end an answer
at the same character.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from hired_batch.config import ConfigError, GenerationConfig
from hired_batch.engine import constraints

# The options one row may set for itself (the ``sampling`` handoff column, Ray Data LLM's
# ``sampling_params``); the system prompt is in the prompt ids already.
PER_ROW_OPTIONS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "json_schema",  # a constraint (engine/constraints.py); a row's replaces the job's
    "choices",
    "regex",
)


def row_generation(generation: GenerationConfig, sampling) -> GenerationConfig | None:
    """One row's options: the job's ``generation`` with the row's ``sampling`` (a JSON
    object of ``PER_ROW_OPTIONS``, or a dict; None or empty: the job's, returned as None),
    checked. Raises ConfigError naming what is wrong (the row's error)."""
    if sampling is None or sampling == "" or sampling == {}:
        return None
    try:
        given = json.loads(sampling) if isinstance(sampling, (str, bytes)) else dict(sampling)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"sampling: expected a JSON object of generation options, got {sampling!r} ({e})") from e
    if not isinstance(given, dict):
        raise ConfigError(f"sampling: expected a JSON object of generation options, got {sampling!r}")
    unknown = sorted(set(given) - set(PER_ROW_OPTIONS))
    if unknown:
        raise ConfigError(f"sampling: unknown option(s) {unknown}; expected some of {list(PER_ROW_OPTIONS)}")
    if "stop" in given:
        given["stop"] = (given["stop"],) if isinstance(given["stop"], str) else tuple(given["stop"] or ())
    try:
        g = dataclasses.replace(generation, **constraints.with_row_constraint(given)).check()
        constraints.check_row(g)
        return g
    except ConfigError as e:
        raise ConfigError(f"sampling: {e}") from e


def sampling_kwargs(generation: GenerationConfig) -> dict:
    """``SamplingParams(**kw)`` for our generation options, decoding as the HF engine does:
    greedy at temperature 0, else sampling with ``top_p``, ``top_k`` and a per-request
    ``seed``; at most ``max_new_tokens``, EOS suppressed before ``min_new_tokens``; the
    repetition penalty (greedy too) and stop strings (not kept in the answer) as the HF
    engine applies them. The system prompt is in the prompt ids already."""
    kw = dict(
        max_tokens=int(generation.max_new_tokens),
        min_tokens=int(generation.min_new_tokens),
        temperature=float(generation.temperature),
        skip_special_tokens=True,
        repetition_penalty=float(generation.repetition_penalty),
        stop=list(generation.stop) or None,
        include_stop_str_in_output=False,
    )
    c = constraints.of(generation)
    if c is not None:  # StructuredOutputsParams' fields (the vLLM backend builds it)
        kw["structured_outputs"] = constraints.vllm_kwargs(c)
    if generation.do_sample:
        kw["top_p"] = float(generation.top_p)
        kw["top_k"] = int(generation.top_k)
        if generation.seed is not None:
            kw["seed"] = int(generation.seed)
    return kw


def hf_generate_kwargs(generation: GenerationConfig) -> dict:
    """Keyword arguments of transformers' ``generate`` for our options, with vLLM's meaning:
    greedy unless ``do_sample``; sampling with ``temperature``, ``top_p`` and ``top_k``
    (0: all tokens, whatever the checkpoint's default). ``repetition_penalty=1.0`` turns
    generate's own processor off even where a checkpoint's generation_config sets one:
    ``RepetitionPenalty`` has vLLM's meaning. The seed and stop strings are the caller's."""
    g = generation
    kw = dict(
        max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, do_sample=g.do_sample, repetition_penalty=1.0
    )
    if g.do_sample:
        kw.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def stop_cut(text: str, stops, after: int = 0) -> int | None:
    """Where an answer ends for stop strings ``stops``: the index in ``text`` where the stop
    string that completes first begins (ties: the first in ``stops``), counting only
    matches that end beyond the first ``after`` characters; None when none matches.

    vLLM 0.32's rule (``check_stop_strings``, with ``min_tokens`` giving ``after``), as
    the text grows one token at a time; the stop string itself is not kept.
    """
    best = None  # (end, start)
    for s in stops:
        start = text.find(s, max(0, after - len(s) + 1))
        if start != -1 and (best is None or start + len(s) < best[0]):
            best = (start + len(s), start)
    return None if best is None else best[1]


class StopStrings:
    """vLLM's stop strings (``SamplingParams.stop``, ``include_stop_str_in_output=False``)
    as a ``generate`` stopping criterion, per row: a row ends at the token whose text
    completes a stop string (``stop_cut``) and its answer is the text before it; the
    other rows of the batch go on.

    A row's text is its tokens decoded as the answer is (``decode``), up to EOS. As in
    vLLM, a stop string counts only once the row has more than ``min_new_tokens``
    tokens, and only if it ends beyond their text. ``ended[row]`` = (tokens generated,
    including the one that completed the stop string; characters of the text kept).
    Each step decodes every running row's answer so far (only when stop strings are given).
    """

    def __init__(self, decode, stops, min_new_tokens: int, eos: set):
        self.decode = decode
        self.stops = tuple(stops)
        self.min_new_tokens = int(min_new_tokens)
        self.eos = eos
        self.ended = {}  # row -> (tokens generated, characters kept)
        self._after = {}  # row -> characters of its first min_new_tokens tokens

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        """True for each row that has ended on a stop string (generate passes the answer
        ids so far: it runs on embeddings, so there are no prompt ids before them)."""
        rows = input_ids.tolist()  # generate syncs every step anyway (its all-finished check)
        for b, tokens in enumerate(rows):
            if b not in self.ended and len(tokens) > self.min_new_tokens and not self.eos.intersection(tokens):
                self._check(b, tokens)
        return torch.tensor([b in self.ended for b in range(len(rows))], dtype=torch.bool, device=input_ids.device)

    def _check(self, b: int, tokens: list) -> None:
        if b not in self._after:
            self._after[b] = len(self.decode(tokens[: self.min_new_tokens])) if self.min_new_tokens else 0
        cut = stop_cut(self.decode(tokens), self.stops, self._after[b])
        if cut is not None:
            self.ended[b] = (len(tokens), cut)


class RepetitionPenalty:
    """vLLM's ``repetition_penalty`` as a ``generate`` logits processor.

    Every token id that occurs in the item's prompt (its text ids and its image
    placeholder ids, padding excluded) or in its answer so far gets its logit divided
    by ``penalty`` when positive and multiplied by it otherwise; the others are left
    alone. That is vLLM 0.32's rule (``apply_penalties``: prompt mask | output mask,
    ``logits *= where(logits > 0, 1 / p, p)`` on float32 logits, before temperature,
    top-k and top-p, in greedy decoding too) and HF's, which on ``inputs_embeds``
    would see only the answer's ids: hence the prompt ids given here.
    """

    def __init__(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, penalty: float):
        self.prompt_ids = prompt_ids  # (B, L) ids, left padding where attention_mask is 0
        self.attention = attention_mask.bool()
        self.penalty = float(penalty)
        self._seen = None  # (B, V) bool: prompt or answer tokens, built at the first step
        self._n_seen = 0  # answer tokens already marked

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._seen is None:
            self._seen = self._prompt_mask(scores)
        if input_ids.shape[1] > self._n_seen:  # the answer ids so far (generate runs on embeddings)
            self._seen.scatter_(1, input_ids[:, self._n_seen :].to(scores.device), True)
            self._n_seen = input_ids.shape[1]
        p = torch.tensor(self.penalty, dtype=scores.dtype, device=scores.device)
        return torch.where(self._seen, scores * torch.where(scores > 0, 1.0 / p, p), scores)

    def _prompt_mask(self, scores: torch.Tensor) -> torch.Tensor:
        ids = self.prompt_ids.to(scores.device)
        real = self.attention.to(scores.device) & (ids < scores.shape[1])
        rows = torch.arange(ids.shape[0], device=scores.device)[:, None].expand_as(ids)
        seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        seen[rows[real], ids[real]] = True
        return seen
