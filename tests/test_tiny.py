"""The tiny checkpoint loads through stock `from_pretrained` and has real LLaVA geometry."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from hired_batch.engine.tiny import KINDS, build_tiny_checkpoint

MODEL_CLASS = {
    "llava_next": LlavaNextForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
}
PROCESSOR_CLASS = {"llava_next": LlavaNextProcessor, "llava": LlavaProcessor}
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> checkpoint directory, each built once for the module (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny_checkpoint(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """kind -> (processor, model), loaded the way a real checkpoint is."""
    out = {}
    for kind, path in checkpoints.items():
        processor = AutoProcessor.from_pretrained(path)
        out[kind] = processor, MODEL_CLASS[kind].from_pretrained(path).eval()
    return out


def _image(width, height, seed=0):
    """A random RGB image (random so no preprocessing step can short-cut it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_files_present_and_safetensors_only(checkpoints, kind):
    names = {p.name for p in checkpoints[kind].iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    }
    assert expected <= names
    assert not [n for n in names if n.endswith(".bin")]
    assert (checkpoints[kind] / "model.safetensors").stat().st_size < 5 * 2**20


@pytest.mark.parametrize("kind", KINDS)
def test_loads_with_stock_classes_and_ids_agree(loaded, kind):
    processor, model = loaded[kind]
    tokenizer, config = processor.tokenizer, model.config
    assert isinstance(processor, PROCESSOR_CLASS[kind])
    assert isinstance(model, MODEL_CLASS[kind])
    image_id, pad_id, eos_id = tokenizer.convert_tokens_to_ids(["<image>", "<pad>", "</s>"])
    assert config.image_token_id == image_id == processor.image_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.text_config.pad_token_id == tokenizer.pad_token_id == pad_id
    assert model.generation_config.pad_token_id == pad_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == eos_id
    assert tokenizer.bos_token == "<s>" and tokenizer.unk_token == "<unk>"


@pytest.mark.parametrize("kind", KINDS)
def test_real_llava_geometry(loaded, kind):
    processor, model = loaded[kind]
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers) == (336, 14, 4)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    image_processor = processor.image_processor
    assert image_processor.crop_size["height"] == image_processor.crop_size["width"] == 336
    assert image_processor.size["shortest_edge"] == 336
    assert processor.patch_size == 14 and processor.num_additional_image_tokens == 1
    if kind == "llava_next":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        assert model.config.image_grid_pinpoints == pinpoints
        assert [list(p) for p in image_processor.image_grid_pinpoints] == pinpoints


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_gives_vicuna_prompt_with_one_image(loaded, kind):
    processor, _ = loaded[kind]
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is this? ASSISTANT:"
    assert prompt.count("<image>") == 1


@pytest.mark.parametrize("size", [(336, 336), (500, 300), (300, 800), (1000, 1000)])
def test_llava_next_placeholders_match_model_features(loaded, size):
    processor, model = loaded["llava_next"]
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(images=_image(*size), text=prompt, return_tensors="pt")
    n_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"],
            inputs["image_sizes"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ).pooler_output
        logits = model(**inputs).logits  # stock transformers raises if the counts disagree
    assert n_placeholders == features[0].shape[0] > 576
    assert torch.isfinite(logits).all()


def test_llava_placeholders_are_576(loaded):
    processor, model = loaded["llava"]
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(images=_image(500, 300), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_generate_with_left_padding(loaded, kind):
    processor, model = loaded[kind]
    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    images = [_image(500, 300, seed=1), _image(300, 800, seed=2)]
    inputs = processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True)
    if kind == "llava_next":  # different sizes -> different placeholder counts -> one row is padded
        assert (inputs["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=5)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 5
    assert ((new >= 0) & (new < len(processor.tokenizer))).all()


def test_same_seed_same_bytes_other_seed_differs(checkpoints, tmp_path, capfd):
    again = build_tiny_checkpoint(tmp_path / "again", "llava_next", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", "llava_next", seed=1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the library prints nothing, not even progress bars
    first = checkpoints["llava_next"]
    assert _sha(again / "model.safetensors") == _sha(first / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(first / "tokenizer.json")
    assert _sha(other / "model.safetensors") != _sha(first / "model.safetensors")


def test_tokenizer_round_trips_an_english_question(loaded):
    tokenizer = loaded["llava_next"][0].tokenizer
    question = "How many dogs are sitting on the red chair near the window?"
    ids = tokenizer(question).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert len(ids) < len(question) // 2  # word pieces, not characters
    assert tokenizer.decode(ids, skip_special_tokens=True) == question


def test_unknown_kind_names_the_allowed_kinds(tmp_path):
    with pytest.raises(ValueError, match="llava_next.*llava"):
        build_tiny_checkpoint(tmp_path, kind="qwen")
