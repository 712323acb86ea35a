"""Build a tiny random-weight LLaVA / LLaVA-NeXT checkpoint on local disk.

Development and CI machines have no GPU and no hub access, so tests and the demo
run on a checkpoint this module writes itself. It has the *token geometry* of the
real llava-hf checkpoints (CLIP 336px / patch 14, 576 patch tokens + CLS per crop,
vision_feature_layer=-2, the anyres grid pinpoints, the CLIP image processor
settings, the vicuna chat template) but tiny widths, so a forward pass over
~3000 visual tokens takes well under a second on two CPU cores.

The directory it writes is a normal `save_pretrained` directory (config.json,
model.safetensors, generation_config.json, tokenizer, processor config, chat
template) and is loaded back with stock `from_pretrained`, the same code path a
real checkpoint takes.

What it does not do: download anything, train anything but the tokenizer, or
produce meaningful answers (the weights are random). It prints nothing.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.utils import logging as hf_logging

from hired_batch.config import SUPPORTED_MODEL_TYPES
from hired_batch.engine.dims import ANYRES_PINPOINTS, LLAVA_FEATURE_LAYER

KINDS = SUPPORTED_MODEL_TYPES  # the layouts the engine runs

# Real LLaVA geometry: CLIP ViT-L/14-336 gives 24x24 = 576 patch tokens + CLS.
IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID_PINPOINTS = [list(hw) for hw in ANYRES_PINPOINTS]  # as the checkpoint's config.json writes them
# OPENAI_CLIP_MEAN / STD, written out so the saved processor config is explicit.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Tiny widths: the whole checkpoint stays around 1-2 MB of float32.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# vLLM's CPU attention takes head sizes 32, 64, 80, ... but not TEXT's 64 / 4 = 16:
# ``build_tiny_checkpoint(path, widths=VLLM_WIDTHS)`` gives the language model
# head_dim 32 (same widths and token geometry); the default checkpoint is unchanged.
VLLM_WIDTHS = {"text": {"num_attention_heads": 2, "num_key_value_heads": 2}}
# Prompts hold up to ~3000 visual tokens (LLaVA-NeXT, 5 crops, unpadded + newlines).
MAX_POSITIONS = 4096

# Llama layout: <unk>=0, <s>=1, </s>=2, then 256 byte-fallback tokens <0x00>..<0xFF>.
BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# An upper bound for the trainer: the corpus runs out of merges first (902 entries
# with tokenizers 0.23, so len(tokenizer) == 904 once <image> and <pad> are added).
BPE_VOCAB_SIZE = 1024
CORPUS_SEED = 1234  # the tokenizer does not depend on the weight seed

# The llava-hf llava-v1.6-vicuna template, also accepting plain-string content:
# "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_checkpoint(path, kind: str = "llava_next", seed: int = 0, widths: dict | None = None) -> pathlib.Path:
    """Write a random-weight `kind` checkpoint to directory `path` and return it.

    `kind` is "llava_next" (layout of llava-hf/llava-v1.6-vicuna-7b-hf) or "llava"
    (layout of llava-hf/llava-1.5-7b-hf). Weights come from `torch.manual_seed(seed)`,
    so the same seed gives the same tensors. Loads back with
    `AutoProcessor.from_pretrained(path)` and the model class's `from_pretrained(path)`.
    `widths` overrides the tiny sizes (see ``resolve_widths``); the geometry stays real.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(kind, tokenizer, seed, widths)
    with _no_progress_bars():
        # transformers >= 5 writes safetensors only; `safe_serialization` is gone.
        model.save_pretrained(path)
        build_processor(kind, tokenizer).save_pretrained(path)
    return path


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' tqdm bars ("Writing model shards") while we save."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- tokenizer ---------------------------------------------------------------

_QUESTIONS = [
    "What is {the} {adj} {noun} doing?",
    "What color is {the} {noun}?",
    "How many {noun}s are in the {place}?",
    "Is there {a} {adj} {noun} {prep} the {place}?",
    "Where is {the} {noun}?",
    "Describe the {place} in detail.",
    "What is written on the {noun}?",
    "Which {noun} is {adj}?",
    "What is this?",
    "Why is {the} {noun} {prep} the {place}?",
    "Can you see {a} {noun}?",
]
_STATEMENTS = [
    "{The} {adj} {noun} is {verb} {prep} the {place}.",
    "There are {num} {noun}s {prep} the {place}.",
    "Yes, {the} {noun} is {adj}.",
    "No, there is no {noun} in the image.",
    "The image shows {a} {adj} {noun} {verb} {prep} {a} {place}.",
    "It is {a} {noun}.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: {q} ASSISTANT: {s}",
]
_WORDS = {
    "adj": "red blue green yellow black white small large old young happy wooden bright dark "
    "tall short round square empty full open closed striped shiny",
    "noun": "dog cat car bus man woman child person bird horse tree house table chair sign "
    "book phone cup bottle plate chart table document page train boat street window "
    "clock bicycle picture photo number word letter label",
    "place": "street room kitchen park field table road beach city garden picture image "
    "background corner office shop river sky",
    "verb": "sitting standing walking running eating holding looking reading parked lying playing flying driving",
    "prep": "on in near under behind beside above next to inside",
    "num": "two three four five six seven eight nine ten 2 3 4 5 10 12 20 100",
}


def _fill(template: str, rng: random.Random) -> str:
    """Fill one corpus template with random words."""
    words = {k: rng.choice(v.split()) for k, v in _WORDS.items()}
    words["a"] = rng.choice(["a", "the", "one"])
    words["the"] = rng.choice(["the", "this", "that"])
    words["The"] = rng.choice(["The", "A", "This"])
    if "{q}" in template:  # a whole vicuna turn, so "USER:" / "ASSISTANT:" get pieces too
        words["q"] = _fill(rng.choice(_QUESTIONS), rng)
        words["s"] = _fill(rng.choice(_STATEMENTS[:-1]), rng)
    return template.format(**words)


def _corpus(n_lines: int = 1500) -> list[str]:
    """An English-ish corpus (~10k words) of VQA-style questions and answers."""
    rng = random.Random(CORPUS_SEED)
    templates = _QUESTIONS + _STATEMENTS
    return [_fill(rng.choice(templates), rng) for _ in range(n_lines)]


def _train_bpe() -> tuple[dict, list]:
    """Train a sentencepiece-style (Metaspace) BPE; return its vocab and merges."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # split=True keeps merges inside words, as sentencepiece does for Llama.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=BASE_SPECIALS + BYTE_TOKENS,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_tokenizer() -> LlamaTokenizer:
    """A Llama-style BPE tokenizer (byte fallback, bos added) trained in-process.

    `<image>` and `<pad>` are added after the trained vocab, as in llava-hf, so
    their ids are the last two and `len(tokenizer)` is the model's vocab size.
    """
    vocab, merges = _train_bpe()
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        model_max_length=MAX_POSITIONS,
        # A *named* extra special token gives `tokenizer.image_token(_id)`,
        # which the llava processors read in preference to their own argument.
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- model -------------------------------------------------------------------


def resolve_widths(widths: dict | None = None) -> tuple[dict, dict]:
    """(vision, text) size dicts: the tiny defaults updated by ``widths``.

    ``widths`` = {"vision": {...}, "text": {...}} with any of hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads (text also
    num_key_value_heads); absent keys keep the tiny values. Unknown keys are refused.
    """
    widths = dict(widths or {})
    unknown = set(widths) - {"vision", "text"}
    if unknown:
        raise ValueError(f"widths takes the keys 'vision' and 'text', got {sorted(unknown)}")
    vision, text = dict(VISION), dict(TEXT)
    for name, base, allowed in (("vision", vision, set(VISION)), ("text", text, set(TEXT) | {"num_key_value_heads"})):
        extra = set(widths.get(name, {})) - allowed
        if extra:
            raise ValueError(f"widths[{name!r}] takes {sorted(allowed)}, got {sorted(extra)}")
        base.update(widths.get(name, {}))
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    return vision, text


def _vision_config(widths: dict | None = None) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 geometry at tiny width (quick_gelu like the real tower)."""
    vision, _ = resolve_widths(widths)
    return CLIPVisionConfig(
        **vision,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _text_config(tokenizer: LlamaTokenizer, widths: dict | None = None) -> LlamaConfig:
    """A tiny Llama whose vocab is exactly the tokenizer's."""
    _, text = resolve_widths(widths)
    return LlamaConfig(
        **text,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def model_config(kind: str, tokenizer: LlamaTokenizer, widths: dict | None = None) -> LlavaConfig | LlavaNextConfig:
    """The top-level LLaVA config for `kind`, tied to `tokenizer`'s special ids."""
    common = dict(
        vision_config=_vision_config(widths),
        text_config=_text_config(tokenizer, widths),
        image_token_index=tokenizer.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=LLAVA_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,  # top-level too, as in the llava-hf configs
    )
    if kind == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=GRID_PINPOINTS)
    return LlavaConfig(**common)


def build_model(kind: str, tokenizer: LlamaTokenizer, seed: int, widths: dict | None = None):
    """Random-init the model of `kind` in float32 from `seed`, with its generation config."""
    config = model_config(kind, tokenizer, widths)
    is_next = kind == "llava_next"
    cls = LlavaNextForConditionalGeneration if is_next else LlavaForConditionalGeneration
    # The model's own _init_weights draws from here: Llama normal(0, 0.02), CLIP its
    # width-scaled init (~0.06 for q/k/v here); varied greedy tokens, no NaNs.
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


# --- processor ---------------------------------------------------------------


def _image_processor(kind: str):
    """The CLIP-style image processor with the llava-hf settings for `kind`.

    PIL backend so it builds without torchvision (absent on our CPU machines); the
    saved type is "Llava(Next)ImageProcessor", so loading picks whichever backend
    the loading machine has.
    """
    common = dict(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
        resample=3,  # bicubic
    )
    if kind == "llava_next":
        return LlavaNextImageProcessorPil(**common, do_pad=True, image_grid_pinpoints=GRID_PINPOINTS)
    # llava-1.5 ships a CLIPImageProcessor: resize + center crop, no pad-to-square.
    return LlavaImageProcessorPil(**common, do_pad=False)


def build_processor(kind: str, tokenizer: LlamaTokenizer):
    """The processor for `kind`; its `<image>` expansion matches the model's feature count.

    num_additional_image_tokens=1 counts the CLS token, which the "default" strategy
    then drops again; without it LLaVA-NeXT's processor is off by one per image.
    """
    cls = LlavaNextProcessor if kind == "llava_next" else LlavaProcessor
    return cls(
        image_processor=_image_processor(kind),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
