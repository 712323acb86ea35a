"""Loading a LLaVA checkpoint and preparing its inputs on CPU (the engine's first step).

- ``load_llava``: (model, processor) from a hub id or a local directory; safetensors
  only, never remote code, SDPA attention.
- ``chat_prompt``: the prompt text every engine sends (chat template, optional system
  message, one ``<image>``).
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
FALLBACK_SYSTEM = "{system} "  # before FALLBACK_TEMPLATE, as llava-hf's vicuna templates render a system message


# --------------------------------------------------------------------------- loading


def resolve_device(device: str) -> torch.device:
    """Our ``--device`` as a torch device (``auto``: CUDA when available, else CPU)."""
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
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cfg.check()
    hf_cfg = AutoConfig.from_pretrained(cfg.path, trust_remote_code=False)
    classes = {"llava_next": LlavaNextForConditionalGeneration, "llava": LlavaForConditionalGeneration}
    if hf_cfg.model_type not in classes:
        raise ConfigError(
            f"model {cfg.path!r} has model_type {hf_cfg.model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    device = resolve_device(cfg.device)
    model = classes[hf_cfg.model_type].from_pretrained(
        cfg.path,
        dtype=resolve_dtype(cfg.dtype, device),
        use_safetensors=True,
        trust_remote_code=False,
        attn_implementation="sdpa",
    )
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(cfg.path, trust_remote_code=False)
    return model, processor


# --------------------------------------------------------------------------- preprocessing


class PromptError(ValueError):
    """A row's question cannot make a prompt (its text holds the image token); the
    message is the row's error, ``"question: "`` first."""


@dataclass
class Prepared:
    """One item ready for the GPU: what the CPU stage hands over (all numpy)."""

    input_ids: np.ndarray  # (L,) int64, exactly one image token
    pixel_values: np.ndarray  # (P, 3, H, W) float32; P = 1 + rows*cols (LLaVA-NeXT) or 1
    image_size: np.ndarray  # (2,) int64 original (height, width)


def chat_prompt(processor, question: str, system_prompt: str | None = None) -> str:
    """The prompt text of one item, the same for every engine: the checkpoint's chat
    template around one image and the question, after a system message when
    ``system_prompt`` is given; ``FALLBACK_TEMPLATE`` (and ``FALLBACK_SYSTEM``) for a
    processor without a template. ``processor``: the checkpoint's ``AutoProcessor``."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if system_prompt is not None:  # list content: llava-hf templates read content[0]['text']
            conv.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    prompt = FALLBACK_TEMPLATE.format(question=question)
    return prompt if system_prompt is None else FALLBACK_SYSTEM.format(system=system_prompt) + prompt


def check_system_prompt(processor, system_prompt: str | None) -> None:
    """ConfigError unless the checkpoint's chat template renders ``system_prompt`` into
    the prompt: some templates refuse a system message (a template error) and some drop
    it without a word; either would fail or mislead every row once the job runs."""
    if system_prompt is None:
        return
    import jinja2

    try:
        text = chat_prompt(processor, "?", system_prompt)
    except jinja2.TemplateError as e:
        raise ConfigError(f"system prompt given, but the model's chat template refuses a system message: {e}") from None
    if system_prompt not in text:
        raise ConfigError(
            f"system prompt given, but the model's chat template leaves it out of the prompt "
            f"(it rendered {text!r}); drop --system-prompt or put it in --prompt"
        )


class Preprocessor:
    """Builds prompts and pixel values on CPU; holds the processor, never the weights."""

    def __init__(self, processor, model_type: str, system_prompt: str | None = None):
        self.processor = processor
        self.model_type = model_type
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        check_system_prompt(processor, system_prompt)
        self.system_prompt = system_prompt  # before every question, through the chat template
        n = self._count_image_tokens(self.prompt("?"))
        if n != 1:  # the system prompt holds the token (or the template lost it): every row would fail
            raise ConfigError(
                f"the chat template with this system prompt holds {n} image tokens "
                f"({self.image_token!r}); expected exactly one: drop {self.image_token!r} from "
                "--system-prompt"
            )

    @classmethod
    def from_pretrained(cls, path: str, system_prompt: str | None = None) -> "Preprocessor":
        """Load the processor only (fast: no weights)."""
        from transformers import AutoConfig, AutoProcessor

        model_type = AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
        return cls(AutoProcessor.from_pretrained(path, trust_remote_code=False), model_type, system_prompt)

    def prompt(self, question: str) -> str:
        """The checkpoint's chat template around one image and the question (``chat_prompt``)."""
        return chat_prompt(self.processor, question, self.system_prompt)

    def _count_image_tokens(self, text: str) -> int:
        ids = self.tokenizer(text)["input_ids"]
        return int(sum(1 for t in ids if t == self.image_token_id))

    def prompt_ids(self, question: str) -> np.ndarray:
        """The prompt's token ids (int64), holding one ``<image>`` placeholder: what both
        engines receive (vLLM expands the placeholder itself).

        Raises PromptError when the question's text tokenizes to the image token (the
        literal ``<image>``, say): the model takes one image per prompt.
        """
        ids = np.asarray(self.tokenizer(self.prompt(question))["input_ids"], dtype=np.int64)
        extra = int((ids == self.image_token_id).sum()) - 1  # the template's own is checked in __init__
        if extra:
            raise PromptError(
                f"question: holds the image token {self.image_token!r} ({extra} time(s)); the model "
                "takes one image per prompt, placed by the chat template"
            )
        return ids

    def __call__(self, image, question: str) -> Prepared:
        """Prepare one (PIL RGB image, question) pair."""
        ids = self.prompt_ids(question)
        pixels, size = self.pixels(image)
        return Prepared(ids, pixels, size)

    def pixels(self, image, **options) -> tuple[np.ndarray, np.ndarray]:
        """(crops (P, 3, H, W), image size (2,) int64) of one PIL RGB image by the
        checkpoint's image processor: float32 pixel values, or with ``do_rescale=False,
        do_normalize=False`` its uint8 crops (``engine/handoff.py``)."""
        out = self.processor.image_processor(images=[image], return_tensors="np", **options)
        pixels = np.asarray(out["pixel_values"][0])
        pixels = pixels if options else pixels.astype(np.float32, copy=False)
        pixels = pixels[None] if pixels.ndim == 3 else pixels  # LLaVA-1.5: (3,H,W) -> (1,3,H,W)
        size = np.asarray(out["image_sizes"][0] if "image_sizes" in out else (image.height, image.width))
        return pixels, size.astype(np.int64)
