"""The lean handoff: one item's image between the CPU stage and the generation stage.

The preprocessing actors decode and validate every image and plan its tokens; what they
hand the generation actors through Ray's object store is, per item, the prompt ids and
the smaller of

- ``ENCODED``: the bytes the image was decoded from (the file as read; a lossless PNG
  when it came as pixels), decoded again in the generation actor (``decode``: the same
  RGB pixels, since decoding is deterministic), and
- ``CROPS`` (HF engine only): the image processor's crops as uint8, resized, padded and
  cut but not yet rescaled or normalised; the generation actor makes the float32 pixel
  values (``normalized``), bit-identical to the processor's own (``crops_exact`` checks
  that once per processor; a processor where they differ ships ``ENCODED`` only).

vLLM takes a PIL image, not pixel values, so its handoff is always ``ENCODED``. Float
pixel values never cross the object store. ``item_bytes`` is the one measure of what a
row carries there (the job's ``handoff_bytes`` column, its summary and the bench use it).
No Ray here.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np

from hired_batch.config import DecodeLimits
from hired_batch.engine.inputs import decode_image, source_bytes

ENCODED = "encoded"  # the image's encoded bytes (the file, or a lossless PNG)
CROPS = "crops"  # uint8 (n_parts, 3, H, W): the processor's crops before rescale/normalise

# Handed-over bytes already passed the job's limits in the CPU stage: decoding them again
# refuses nothing (PIL's own decompression-bomb guard still holds).
_AGAIN = DecodeLimits(max_pixels=2**62, min_side=1, max_aspect_ratio=math.inf)
_RAW_OPTIONS = dict(do_rescale=False, do_normalize=False)  # the processor's uint8 crops


def item_bytes(values) -> int:
    """Bytes one handoff row carries through Ray's object store: the payload of its
    values (binary and text by length, numbers by their width, nulls 0). Arrow adds a few
    bytes of offsets and validity per value; the image dominates."""
    total = 0
    for v in values:
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray, memoryview)):
            total += len(v)
        elif isinstance(v, str):
            total += len(v.encode())
        elif isinstance(v, (np.ndarray, np.generic)):
            total += int(v.nbytes)
        else:  # Python int / float / bool
            total += 8
    return total


def encoded(image) -> bytes:
    """The bytes to hand over for ``image`` (a PIL RGB image from ``decode_image``): the
    file it was decoded from, or a lossless PNG of its pixels."""
    data = source_bytes(image)
    if data is not None:
        return bytes(data)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless; level 1: fast, still small
    return buf.getvalue()


def decode(data) -> "Image.Image":  # noqa: F821 - PIL
    """The RGB image ``encoded`` bytes hold: the pixels the CPU stage decoded."""
    image, err = decode_image(bytes(data), limits=_AGAIN)
    if err:  # the CPU stage decoded these very bytes: a bug, not data
        raise ValueError(f"handed-over image bytes no longer decode: {err}")
    return image


def _hw(v) -> tuple[int, int]:
    """(height, width) of a processor size (a dict or a SizeDict)."""
    get = v.get if isinstance(v, dict) else lambda k: getattr(v, k, None)
    return int(get("height")), int(get("width"))


def crop_hw(pre) -> tuple[int, int]:
    """(height, width) of one crop of ``pre``'s image processor (336 x 336 for LLaVA)."""
    return _hw(pre.processor.image_processor.crop_size)


def n_crops(pre, image_size) -> int:
    """Crops the processor cuts from an image of (height, width), from its geometry
    (LLaVA-NeXT's anyres grid plus the full image; LLaVA-1.5: one), without running it."""
    from hired_batch.engine import token_plan  # torch: only where images are packed

    ip = pre.processor.image_processor
    pins = getattr(ip, "image_grid_pinpoints", None) if pre.model_type == "llava_next" else None
    side = crop_hw(pre)[0]
    geo = token_plan.Geometry(n_tokens=0, crop_px=side, pinpoints=tuple(map(tuple, pins)) if pins else None)
    return token_plan.n_parts(token_plan.grid_of(image_size, geo))


def normalized(pre, crops: np.ndarray) -> np.ndarray:
    """float32 pixel values of uint8 ``crops`` (n_parts, 3, H, W), by the same operations
    ``pre``'s image processor runs after cutting them: its fused rescale-and-normalise
    (torchvision backend), or rescale then normalise per crop (PIL backend)."""
    ip = pre.processor.image_processor
    mean, std = tuple(ip.image_mean), tuple(ip.image_std)
    if hasattr(ip, "rescale_and_normalize"):
        import torch

        writable = torch.from_numpy(np.array(crops))  # a copy: torch refuses read-only buffers
        out = ip.rescale_and_normalize(writable, ip.do_rescale, ip.rescale_factor, ip.do_normalize, mean, std)
        return out.numpy().astype(np.float32, copy=False)
    out = []
    for c in crops:
        c = ip.rescale(c, ip.rescale_factor) if ip.do_rescale else c
        out.append(ip.normalize(c, mean, std) if ip.do_normalize else c)
    return np.asarray(out, dtype=np.float32)


def uint8_crops(pre, image) -> np.ndarray:
    """The crops (n_parts, 3, H, W) ``pre``'s image processor cuts from ``image``, before
    rescaling and normalising (uint8 with the processors we run; ``crops_exact`` checks)."""
    return pre.pixels(image, **_RAW_OPTIONS)[0]


@functools.lru_cache(maxsize=8)
def crops_exact(pre) -> bool:
    """Whether ``pre``'s processor gives uint8 crops whose ``normalized`` pixel values
    equal its own, bit for bit (checked on a noise image; the operations are per pixel)."""
    from PIL import Image

    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (377, 500, 3), dtype=np.uint8))
    raw = uint8_crops(pre, probe)
    if raw.dtype != np.uint8:
        return False
    return bool(np.array_equal(normalized(pre, raw), pre.pixels(probe)[0]))


def pack_pixels(pre, image) -> dict:
    """The HF engine's image handoff of one decoded image: ``image`` (bytes),
    ``image_kind`` (ENCODED or CROPS) and ``n_parts`` (its crops), the smaller of the
    encoded bytes and the uint8 crops (``pixel_values`` makes the float pixels)."""
    parts = n_crops(pre, (image.height, image.width))
    crop_bytes = parts * 3 * math.prod(crop_hw(pre))
    source = source_bytes(image)
    # no file behind the image (it came as pixels): a PNG only when the raw pixels are smaller than the crops
    smaller = len(source) < crop_bytes if source is not None else image.width * image.height * 3 < crop_bytes
    if smaller or not crops_exact(pre):
        return dict(image=encoded(image), image_kind=ENCODED, n_parts=parts)
    crops = uint8_crops(pre, image)
    return dict(image=crops.tobytes(), image_kind=CROPS, n_parts=int(crops.shape[0]))


def pixel_values(pre, data, kind: str, n_parts: int) -> np.ndarray:
    """float32 (n_parts, 3, H, W) pixel values of one ``pack_pixels`` handoff, equal to
    what ``pre(image, ...)`` makes of the decoded image."""
    if kind == CROPS:
        h, w = crop_hw(pre)
        return normalized(pre, np.frombuffer(data, dtype=np.uint8).reshape(int(n_parts), 3, h, w))
    if kind == ENCODED:
        return pre.pixels(decode(data))[0]
    raise ValueError(f"image_kind must be {ENCODED!r} or {CROPS!r}, got {kind!r}")
