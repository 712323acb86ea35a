"""engine/handoff.py: the lean handoff between the CPU stage and the generation stage.

The pixel values the generation actor makes from the handoff (encoded bytes or uint8
crops) equal, bit for bit, the ones the processor made in the CPU stage before, for
every anyres grid; the encoded bytes decode to the pixels the CPU stage decoded; a row
carries at most 1.2x the smaller of the encoded image and its uint8 crops, plus its
prompt ids; and the stages answer exactly as the engine does on the image itself.
"""

import io

import numpy as np
import pytest
from PIL import Image
from support.images import noise_images
from test_hf import GRID_SIZES
from test_stages import as_numpy

from hired_batch.config import ColumnSpec, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine import handoff
from hired_batch.engine.inputs import decode_image, make_synthetic_image
from hired_batch.engine.weights import Preprocessor
from hired_batch.job.stages import GenerateStage, PreprocessStage

SIZES = [(480, 640), (768, 1024), (3000, 4000)]  # (h, w): the 640x480, 1024x768, 12 MP


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    image, err = decode_image(data)
    assert err is None
    return image


@pytest.mark.parametrize("kind", ["tiny_next", "tiny_llava"])
def test_pixel_values_made_from_either_handoff_equal_the_processors_for_every_grid(kind, request):
    pre = Preprocessor.from_pretrained(str(request.getfixturevalue(kind)))
    assert handoff.crops_exact(pre)
    for image in noise_images(GRID_SIZES + [(3000, 4000)], seed=3):
        want = pre.pixels(image)[0]
        crops = handoff.uint8_crops(pre, image)
        assert crops.dtype == np.uint8 and crops.shape[0] == handoff.n_crops(pre, (image.height, image.width))
        from_crops = handoff.pixel_values(pre, crops.tobytes(), handoff.CROPS, crops.shape[0])
        from_bytes = handoff.pixel_values(pre, handoff.encoded(image), handoff.ENCODED, crops.shape[0])
        assert from_crops.dtype == from_bytes.dtype == np.float32
        assert np.array_equal(from_crops, want) and np.array_equal(from_bytes, want)


def test_the_encoded_bytes_decode_to_the_pixels_the_cpu_stage_decoded():
    base = make_synthetic_image(120, 80, 5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    grey16 = Image.fromarray((np.arange(80 * 120, dtype=np.uint16).reshape(80, 120) * 7))
    files = [
        encode(base, "JPEG", exif=exif.tobytes()),
        encode(base.convert("RGBA"), "PNG"),
        encode(grey16, "PNG"),
        encode(base.convert("CMYK"), "JPEG"),
        encode(base.convert("P"), "GIF"),
    ]
    values = files + [base, np.asarray(base)]  # pixels, not files: handed over as a lossless PNG
    for value in values:
        image, err = decode_image(value)
        assert err is None
        data = handoff.encoded(image)
        if isinstance(value, bytes):
            assert data == value  # the file itself, not a re-encoding
        again = handoff.decode(data)
        assert again.mode == "RGB" and np.array_equal(np.asarray(again), np.asarray(image))
    assert decoded(files[0]).size == (80, 120)  # the EXIF rotation happened, both times


def test_a_row_carries_at_most_the_encoded_image_or_its_crops_plus_prompt_ids(tiny_next):
    smooth = [encode(make_synthetic_image(w, h, 1), "JPEG", quality=90) for h, w in SIZES]
    noisy = [encode(im, "PNG") for im in noise_images([(768, 1024)], seed=4)]  # its crops are smaller
    files = smooth + noisy
    pre = Preprocessor.from_pretrained(str(tiny_next))
    crop_bytes = [handoff.uint8_crops(pre, decoded(f)).nbytes for f in files]
    kinds = set()
    for engine in ("hf", "vllm"):
        stage = PreprocessStage(str(tiny_next), ColumnSpec(), engine=engine)
        batch = {
            "id": np.array([f"r{i}" for i in range(len(files))], dtype=object),
            "image": np.array(files, dtype=object),
            "question": np.array(["What is this?"] * len(files), dtype=object),
        }
        rows = stage(batch).to_pylist()
        for f, crops, row in zip(files, crop_bytes, rows):
            assert row["error"] is None
            bound = len(f) if engine == "vllm" else min(len(f), crops)  # vLLM needs an image, not crops
            got = handoff.item_bytes(row.values())
            assert got <= 1.2 * bound + len(row["input_ids"]), (engine, got, len(f), crops)
            assert got >= min(len(f), crops if engine == "hf" else len(f))  # the image itself is in it
            kinds.add(row.get("image_kind"))
    assert kinds == {handoff.ENCODED, handoff.CROPS, None}  # both kinds on hf (None: vllm's rows)


def test_the_stages_answer_as_the_engine_does_on_the_image_itself_for_every_grid(tiny_next):
    """Greedy, float32: the stages (lean handoff) and the engine's own path (pixel values
    made from the decoded image) give the same answers and kept counts, on every anyres
    grid, from encoded bytes and from uint8 crops."""
    model = ModelConfig(path=str(tiny_next), dtype="float32", device="cpu")
    gen = GenerationConfig(max_new_tokens=4)
    stage = GenerateStage(model, SelectionConfig(budget=0.2), gen, batch_size=1)
    engine = stage.runner.engine
    sizes = list({engine.grid_of(s): s for s in GRID_SIZES}.values())
    assert len(sizes) == 5  # one image per anyres grid
    files = [encode(make_synthetic_image(w, h, 2), "JPEG") for h, w in sizes]  # encoded < crops
    files += [encode(im, "PNG") for im in noise_images(sizes, seed=5)]  # crops < encoded
    pre = PreprocessStage(str(tiny_next), ColumnSpec())
    batch = {
        "id": np.array([f"r{i}" for i in range(len(files))], dtype=object),
        "image": np.array(files, dtype=object),
        "question": np.array(["What is in it?"] * len(files), dtype=object),
    }
    hand = pre(batch)
    assert set(hand.column("image_kind").to_pylist()) == {handoff.ENCODED, handoff.CROPS}
    out = stage.table(as_numpy(hand))
    for f, row in zip(files, out.to_pylist()):
        (want,) = engine.generate([decoded(f)], ["What is in it?"]).items  # pixel values from the image
        assert row["error"] is None
        assert (row["answer"], row["n_visual_tokens_kept"]) == (want["answer"], want["n_visual_tokens_kept"])
        assert row["n_generated_tokens"] == want["n_generated_tokens"]


def test_the_vllm_generation_actor_asks_with_the_pixels_the_cpu_stage_decoded(tiny_next):
    """The vLLM backend's per-row request (no vLLM here: its ``answer`` is recorded)."""
    import asyncio

    from hired_batch.engine.vllm.backend import VllmBackend
    from hired_batch.engine.vllm.backend import encode as vllm_handoff

    asked = []

    class Recorder:
        async def answer(self, ids, image, generation=None, prefilled=None):
            asked.append((ids, image, generation))
            return "answered"

    pre = Preprocessor.from_pretrained(str(tiny_next))
    image = decoded(encode(make_synthetic_image(300, 200, 7), "JPEG"))
    row = dict(vllm_handoff(pre, image, "Why?"), generation=None)
    assert asyncio.run(VllmBackend._row(Recorder(), row)) == "answered"
    ((ids, got, _),) = asked
    assert ids == pre.prompt_ids("Why?").tolist()
    assert np.array_equal(np.asarray(got), np.asarray(image))
