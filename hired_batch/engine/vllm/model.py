"""vLLM model and multimodal-processor classes with HiRED, built on vLLM's own LLaVA classes.

What is overridden, and nothing else (vLLM 0.32):

- processor ``_call_hf_processor``: strips the ``hired_*`` request options before the
  HF processor sees them and adds two per-image fields, ``hired_tokens`` (the count
  ``token_plan.visual_tokens`` plans for the image) and ``hired_alpha``;
  ``_get_mm_fields_config`` declares them; ``_get_prompt_updates`` expands each
  ``<image>`` to ``hired_tokens`` placeholders. vLLM's multimodal cache keys items by
  their ``mm_processor_kwargs``, so a per-request budget gets its own entry.
- model ``embed_multimodal``: vLLM's CLIP tower runs with ``ClsAttentionHooks`` on
  the layers the selector ``needs`` (CLS rows from the fused qkv projection, no T x T
  matrix); ``selectors.select`` and ``selectors.embed`` (the HF engine's own path)
  pick the tokens sent and project only those, in LLaVA's order. ``load_weights`` also accepts CLIP
  names saved by transformers 5 (``vision_tower.embeddings...``).

With a stock selector (``hired_selector: full``), and for image embeddings given by
the user, every method falls through to vLLM's stock code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from hired_batch.engine import selectors, token_plan
from hired_batch.engine.vision import ClsAttentionHooks, note_vision_run, selection_layers, vision_parts
from hired_batch.engine.vllm import hub_clip_name
from hired_batch.engine.vllm.options import engine_selection, request_selection, split_request

# Per-image fields the processor adds and the model reads.
TOKENS, ALPHA = "hired_tokens", "hired_alpha"


# --------------------------------------------------------------------------- processor


class _HiredProcessor:
    """Mixin over a vLLM LLaVA processor: HiRED's placeholder count per image."""

    def __init__(self, info, dummy_inputs):
        super().__init__(info, dummy_inputs)
        cfg = info.get_hf_config()
        # Built in the front-end process before the engine core starts: bad
        # hf_overrides fail here, with a ValueError naming the option.
        self.selection = engine_selection(cfg)
        engine_kwargs = info.ctx.get_mm_config().mm_processor_kwargs or {}
        misplaced = sorted(k for k in engine_kwargs if k.startswith("hired_"))
        if misplaced:  # vLLM would hand them to the HF processor, not to us
            raise ValueError(
                f"HiRED: engine-wide options {misplaced} go in hf_overrides, not in the "
                "engine's mm_processor_kwargs (per request, mm_processor_kwargs is right)"
            )
        self.geometry = token_plan.Geometry.from_config(cfg)

    @property
    def _stock(self) -> bool:
        return selectors.get(self.selection.selector).stock

    def _call_hf_processor(self, hf_data, hf_kwargs):
        selection = request_selection(self.selection, hf_kwargs)
        _, rest = split_request(hf_kwargs)
        out = super()._call_hf_processor(hf_data, rest)
        if self._stock:
            return out
        sizes = self._image_sizes(out)
        out[TOKENS] = torch.tensor([token_plan.visual_tokens(s, selection, self.geometry) for s in sizes])
        out[ALPHA] = torch.tensor([float(selection.alpha)] * len(sizes), dtype=torch.float64)
        return out

    def _image_sizes(self, out) -> list[tuple[int, int]]:
        """(height, width) per image: the HF processor's for LLaVA-NeXT; one crop for LLaVA-1.5."""
        if "image_sizes" in out:
            return [tuple(int(v) for v in s) for s in out["image_sizes"]]
        side = self.geometry.crop_px  # LLaVA-1.5: the count does not depend on the size
        return [(side, side)] * len(out["pixel_values"])

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if not self._stock:
            fields.update({f: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for f in (TOKENS, ALPHA)})
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if self._stock:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int):
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):  # the user's own embeddings: as many as given
                return [image_token_id] * images.get_feature_size(item_idx)
            return [image_token_id] * int(out_mm_kwargs["image"][item_idx][TOKENS].data)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class HiredLlavaNextProcessor(_HiredProcessor, LlavaNextMultiModalProcessor):
    """vLLM's LLaVA-NeXT processor with HiRED's placeholder counts."""


class HiredLlavaProcessor(_HiredProcessor, LlavaMultiModalProcessor):
    """vLLM's LLaVA-1.5 processor with HiRED's placeholder counts."""


# --------------------------------------------------------------------------- model


class _HiredModel:
    """Mixin over a vLLM LLaVA model: the vision pass sends only the kept, projected tokens."""

    def _setup_hired(self) -> None:
        cfg = self.config
        self.hired_selection = engine_selection(cfg)
        self.hired_geometry = token_plan.Geometry.from_config(cfg)
        _, _, self.hired_layers = vision_parts(self.vision_tower)
        _, self.hired_l_init, self.hired_l_final = selection_layers(cfg, len(self.hired_layers))

    def embed_multimodal(self, **kwargs):
        tokens, alphas = kwargs.pop(TOKENS, None), kwargs.pop(ALPHA, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if not isinstance(image_input, (LlavaImageEmbeddingInputs, LlavaNextImageEmbeddingInputs)):
            # the tower runs on these images (counted for tests)
            note_vision_run(len(image_input["pixel_values"]))
        if tokens is None or isinstance(image_input, (LlavaImageEmbeddingInputs, LlavaNextImageEmbeddingInputs)):
            return self._process_image_input(image_input)  # stock: `full`, or the user's embeddings
        pixels = image_input["pixel_values"]
        parts = [p if p.dim() == 4 else p[None] for p in pixels]  # per image (P_i, 3, H, W)
        sizes = self._hired_sizes(image_input, len(parts))
        return self._hired_embeddings(parts, sizes, [int(t) for t in tokens], [float(a) for a in alphas])

    def _hired_sizes(self, image_input, n: int) -> list[tuple[int, int]]:
        sizes = image_input.get("image_sizes")
        if sizes is None:  # LLaVA-1.5: one crop, the size does not enter the count
            return [(self.hired_geometry.crop_px,) * 2] * n
        return [tuple(int(v) for v in s) for s in sizes]

    def _hired_embeddings(self, parts, sizes, tokens, alphas) -> list[torch.Tensor]:
        """Per image (K_i, D): the sent tokens' projected features, in LLaVA order."""
        s, geo = self.hired_selection, self.hired_geometry
        needs = selectors.get(s.selector).needs
        roles = needs.layer_ids(self.hired_l_init, self.hired_l_final)
        key_roles = needs.key_layer_ids(self.hired_l_init, self.hired_l_final)
        hooks = ClsAttentionHooks(
            self.hired_layers,
            set(roles.values()),
            self.config.vision_config.num_attention_heads,
            key_ids=set(key_roles.values()),
            state_ids=[self.hired_l_final] if needs.cls_state else [],  # the feature layer's CLS state
        )
        try:
            feats = self._image_pixels_to_features(self.vision_tower, torch.cat(parts))  # (sum P, N, Dv)
        finally:
            hooks.remove()
        # the processor's count k as the budget: visual_tokens gives k back, so the same masks
        sels = [dataclasses.replace(s, budget_tokens=k, alpha=alpha) for k, alpha in zip(tokens, alphas)]
        layouts = [token_plan.layout(size, geo) for size in sizes]
        rows = {role: hooks.rows[lid] for role, lid in roles.items()}
        keys = {role: hooks.keys[lid] for role, lid in key_roles.items()}
        sent = selectors.select(sels, layouts, feats, rows, keys, hooks.states.get(self.hired_l_final))
        if [len(t.indices) for t in sent] != tokens:
            raise RuntimeError(f"HiRED sent {[len(t.indices) for t in sent]} tokens for images planned at {tokens}")
        n_parts = [p.shape[0] for p in parts]
        return selectors.embed(sent, feats, n_parts, self.multi_modal_projector, getattr(self, "image_newline", None))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(_transformers5_clip_names(weights))


def _transformers5_clip_names(weights):
    """CLIP weights saved by transformers 5 under the names vLLM's CLIP expects (``hub_clip_name``)."""
    for name, w in weights:
        yield hub_clip_name(name), w


@MULTIMODAL_REGISTRY.register_processor(
    HiredLlavaNextProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class HiredLlavaNextForConditionalGeneration(_HiredModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with HiRED token pruning."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_hired()


@MULTIMODAL_REGISTRY.register_processor(
    HiredLlavaProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class HiredLlavaForConditionalGeneration(_HiredModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with HiRED token pruning."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_hired()
