"""Loading a LLaVA checkpoint and preparing its inputs on CPU (the engine's first step).

- ``load_llava``: (model, processor) from a hub id or a local directory; safetensors
  only, never remote code, SDPA attention.
- ``Preprocessor``: chat-template prompt with one ``<image>`` id, anyres pixel values
  and the image size, as picklable numpy, so a Ray CPU stage can run it apart from
  the GPU. It holds the processor, never the weights.

This module does not know Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hired_batch.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig

FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


# --------------------------------------------------------------------------- loading


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Our ``--dtype`` as a torch dtype on ``device`` (``auto``: float16 on CUDA, float32 on CPU);
    both engines resolve it here."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_llava(cfg: ModelConfig):
    """Load (model, processor) from a hub id or a local directory.

    Safetensors only and never remote code: a checkpoint that needs either is refused.
    Raises ConfigError for a model type other than LLaVA-NeXT / LLaVA-1.5.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    from transformers import LlavaNextForConditionalGeneration

    cfg.check()
    hf_cfg = AutoConfig.from_pretrained(cfg.path, trust_remote_code=False)
    classes = {"llava_next": LlavaNextForConditionalGeneration, "llava": LlavaForConditionalGeneration}
    if hf_cfg.model_type not in classes:
        raise ConfigError(
            f"model {cfg.path!r} has model_type {hf_cfg.model_type!r}; "
            f"expected one of {SUPPORTED_MODEL_TYPES}"
        )
    device = _resolve_device(cfg.device)
    model = classes[hf_cfg.model_type].from_pretrained(
        cfg.path, dtype=resolve_dtype(cfg.dtype, device), use_safetensors=True,
        trust_remote_code=False, attn_implementation="sdpa",
    )
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(cfg.path, trust_remote_code=False)
    return model, processor


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Prepared:
    """One item ready for the GPU: what the CPU stage hands over (all numpy)."""

    input_ids: np.ndarray  # (L,) int64, exactly one image token
    pixel_values: np.ndarray  # (P, 3, H, W) float32; P = 1 + rows*cols (LLaVA-NeXT) or 1
    image_size: np.ndarray  # (2,) int64 original (height, width)


class Preprocessor:
    """Builds prompts and pixel values on CPU; holds the processor, never the weights."""

    def __init__(self, processor, model_type: str):
        self.processor = processor
        self.model_type = model_type
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)

    @classmethod
    def from_pretrained(cls, path: str) -> "Preprocessor":
        """Load the processor only (fast: no weights)."""
        from transformers import AutoConfig, AutoProcessor

        model_type = AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
        return cls(AutoProcessor.from_pretrained(path, trust_remote_code=False), model_type)

    def prompt(self, question: str) -> str:
        """The checkpoint's chat template around one image and the question."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return FALLBACK_TEMPLATE.format(question=question)

    def prompt_ids(self, question: str) -> np.ndarray:
        """The prompt's token ids (int64), holding one ``<image>`` placeholder: what both
        engines receive (vLLM expands the placeholder itself)."""
        ids = np.asarray(self.tokenizer(self.prompt(question))["input_ids"], dtype=np.int64)
        n_img = int((ids == self.image_token_id).sum())
        if n_img != 1:
            raise ValueError(f"prompt must hold exactly one image token, found {n_img}")
        return ids

    def __call__(self, image, question: str) -> Prepared:
        """Prepare one (PIL RGB image, question) pair."""
        ids = self.prompt_ids(question)
        out = self.processor.image_processor(images=[image], return_tensors="np")
        pixels = np.asarray(out["pixel_values"][0], dtype=np.float32)
        pixels = pixels[None] if pixels.ndim == 3 else pixels  # LLaVA-1.5: (3,H,W) -> (1,3,H,W)
        size = np.asarray(out["image_sizes"][0] if "image_sizes" in out else (image.height, image.width))
        return Prepared(ids, pixels, size.astype(np.int64))
