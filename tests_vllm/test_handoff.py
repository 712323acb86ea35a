"""The lean handoff (``engine/handoff.py``) on this venv's transformers (5.19) and its
torchvision image processor, which the main venv (5.24, no torchvision) does not run:
pixel values made from uint8 crops or encoded bytes equal the processor's, bit for bit,
for every anyres grid."""

import numpy as np
from conftest import picture

from hired_batch.engine import handoff
from hired_batch.engine.weights import Preprocessor

# (width, height) of one image per anyres grid (1x2, 2x1, 2x2, 1x3, 3x1) and a 12 MP photo
SIZES = [(672, 336), (336, 672), (1216, 684), (1008, 336), (336, 1008), (4000, 3000)]


def test_pixel_values_from_the_handoff_equal_the_torchvision_processors(vllm_next):
    pre = Preprocessor.from_pretrained(str(vllm_next))
    assert type(pre.processor.image_processor).__name__ == "LlavaNextImageProcessor"  # the torchvision backend
    assert handoff.crops_exact(pre)
    parts = set()
    for i, (w, h) in enumerate(SIZES):
        image = picture(w, h, seed=i)
        want = pre.pixels(image)[0]
        crops = handoff.uint8_crops(pre, image)
        parts.add(crops.shape[0])
        assert crops.dtype == np.uint8
        assert np.array_equal(handoff.pixel_values(pre, crops.tobytes(), handoff.CROPS, crops.shape[0]), want)
        assert np.array_equal(handoff.pixel_values(pre, handoff.encoded(image), handoff.ENCODED, 0), want)
    assert parts == {3, 4, 5}
