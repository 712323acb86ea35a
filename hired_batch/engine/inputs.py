"""Input decoding and validation: one image and one question per row.

What it does: turns an image value as Parquet / Hugging Face datasets store it (raw
bytes, an HF ``{"bytes", "path"}`` struct, a local path or an fsspec URL) into an RGB
``PIL.Image``, and a question value into a stripped ``str``, or into a short error
string for that row. Bad data never raises here: a corrupt JPEG in row 9,812 becomes an
error row, not a dead batch. Wrong argument types passed by our own code (``limits``,
``storage_options``) do raise, because that is a bug, not data.

Every error is one line, under 200 characters, and starts with a stable prefix:
``"image: "`` or ``"question: "``, so downstream code and users can group them.

What it does not do: no Ray, no torch, no transformers here; no resizing, no
normalisation, no tokenisation (the model layer owns those and the exact token check);
no colour management (ICC profiles are ignored).

Thread safety: nothing here changes PIL's globals. PIL's own decompression-bomb guard
(``Image.MAX_IMAGE_PIXELS``) is left as it is and stays in force on top of ours (its
warning is held back only for rows our own header check refuses anyway);
``ImageFile.LOAD_TRUNCATED_IMAGES`` is never enabled, so truncated files fail.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import time
import warnings
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageOps, UnidentifiedImageError

from hired_batch.config import DecodeLimits

log = logging.getLogger(__name__)

IMAGE_ERROR_PREFIX = "image: "
QUESTION_ERROR_PREFIX = "question: "
MAX_ERROR_CHARS = 199  # error strings stay under 200 characters

# Raster formats that image datasets actually use. An allowlist, because PIL's other
# plugins widen the attack surface for nothing (EPS even shells out to Ghostscript).
# Names missing from this Pillow build are dropped: Image.open raises on unknown names.
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "AVIF")
Image.init()
_FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)

# Integer grey modes whose samples span 0..65535 (16-bit PNG/TIFF/PGM, JPEG 2000).
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


# ---------------------------------------------------------------------------- errors


def _error(prefix: str, text: str) -> str:
    """One line, bounded length: error columns end up in Parquet and in dashboards."""
    line = (prefix + text).replace("\r", " ").replace("\n", " ")
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _image_error(text: str) -> tuple[None, str]:
    return None, _error(IMAGE_ERROR_PREFIX, text)


def _describe(exc: BaseException) -> str:
    """``Type: message``, first line only; PIL's messages are short and path-free here
    because we always hand it an in-memory buffer."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def exception_error(prefix: str, exc: BaseException) -> str:
    """A row's error for an exception nothing expected: ``prefix`` (the stage, e.g.
    ``"preprocess: "``), the exception's type and first line, bounded like every error."""
    return _error(prefix, _describe(exc))


def redact_url(url: str, max_chars: int = 120) -> str:
    """A URL/path safe to print: no ``user:pass@``, no ``?query`` or ``#fragment``
    (presigned URLs carry their signature there), and shortened in the middle."""
    if "://" in url:
        try:
            parts = urlsplit(url)
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        except ValueError:  # malformed (e.g. bad IPv6 brackets): cut by hand
            scheme, _, rest = url.partition("://")
            url = scheme + "://" + rest.split("?")[0].split("#")[0].rpartition("@")[2]
    if len(url) > max_chars:
        head = max_chars // 3
        url = url[:head] + "..." + url[-(max_chars - head - 3) :]
    return url


# ------------------------------------------------------------------------ null checks


def _is_null(value) -> bool:
    """None, float NaN (pandas' missing value) or pandas.NA, without importing pandas."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return type(value).__name__ == "NAType"


# ------------------------------------------------------------------------ image input


def _check_size(width: int, height: int, limits: DecodeLimits) -> str | None:
    """Refuse from the header size alone, before a single pixel is decoded."""
    pixels = width * height
    if pixels > limits.max_pixels:
        return f"too many pixels ({width}x{height} = {pixels} px > max_pixels {limits.max_pixels})"
    if min(width, height) < limits.min_side:
        return f"too small ({width}x{height} px, min side {limits.min_side} px)"
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        return (
            f"aspect ratio too extreme ({width}x{height} px, "
            f"{ratio:.1f} > max_aspect_ratio {limits.max_aspect_ratio:g})"
        )
    return None


def _open_header(data: bytes, limits: DecodeLimits) -> tuple[Image.Image | None, str | None]:
    """``Image.open`` reads the header only; PIL raises a zoo of types on hostile bytes.

    The header's size is checked here, against our limits, before any decoding. PIL's
    ``DecompressionBombWarning`` (between 1x and 2x ``Image.MAX_IMAGE_PIXELS``) is held
    back while the header is read: dropped when our limit refuses the row anyway (the
    row's error says why; the warning would only be noise in the job log), issued as
    usual when our limit accepts a size PIL finds suspicious. PIL's error above 2x is
    untouched. ``catch_warnings`` is local to this call (no global filter), but, like any
    use of it before Python 3.14's context-aware warnings, not isolated between threads.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_FORMATS)
        problem = _check_size(*img.size, limits)
        for w in caught:
            if not (problem and issubclass(w.category, Image.DecompressionBombWarning)):
                # -W error turns this into the exception handled below, as before
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        return (None, problem) if problem else (img, None)
    except UnidentifiedImageError:
        return None, "not an image (cannot identify format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # the Warning arrives as an exception only when warnings are errors (-W error)
        return None, f"too many pixels (PIL decompression-bomb guard: {_describe(exc)})"
    except Exception as exc:  # noqa: BLE001 -- any failure here is a bad row
        return None, f"corrupt image header ({_describe(exc)})"


def _load_pixels(img: Image.Image) -> str | None:
    """Force the full decode now, so truncation shows up here and not in a later stage."""
    try:
        img.load()
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"too many pixels (PIL decompression-bomb guard: {_describe(exc)})"
    except Exception as exc:  # noqa: BLE001 -- decoders raise OSError, SyntaxError, ValueError...
        kind = "truncated image" if "truncat" in str(exc).lower() else "corrupt image data"
        return f"{kind} ({_describe(exc)})"


def _apply_exif_orientation(img: Image.Image, owned: bool) -> Image.Image:
    """Rotate as the camera meant (EXIF tag 0x0112). A broken EXIF block keeps the
    image as stored: the pixels are fine, only the metadata is not."""
    try:
        if owned:  # in place: no copy of the pixels for the common, unrotated case
            ImageOps.exif_transpose(img, in_place=True)
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) grey to 8-bit by scaling 0..65535 onto 0..255.
    PIL's own convert("L") clips at 255, which turns most 16-bit images white."""
    samples = np.asarray(img).astype(np.int64)  # (H, W)
    samples = np.clip(samples, 0, 65535)
    return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels become white, not black (convert("RGB") drops alpha, which
    leaves whatever colour the transparent pixels happen to store, often black)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha on white, 16-bit grey scaled, the rest via convert."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _WIDE_GREY_MODES:
        return _wide_grey_to_l(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, F (clipped to 0..255)


def _finish(img: Image.Image, limits: DecodeLimits, owned: bool):
    """Header checks, full decode, EXIF rotation, RGB: the path every input shares."""
    problem = _check_size(*img.size, limits) or _load_pixels(img)
    if problem:
        return _image_error(problem)
    img = _apply_exif_orientation(img, owned)
    try:
        return _to_rgb(img), None
    except Exception as exc:  # noqa: BLE001 -- e.g. a mode with no RGB conversion
        return _image_error(f"unsupported color mode {img.mode} ({_describe(exc)})")


def _decode_bytes(data, limits: DecodeLimits):
    if len(data) == 0:
        return _image_error("empty image (0 bytes)")
    img, problem = _open_header(bytes(data), limits)
    if problem:
        return _image_error(problem)
    img, problem = _finish(img, limits, owned=True)
    if img is not None:  # decoding these bytes again gives these pixels: the lean handoff ships them
        setattr(img, _SOURCE_ATTR, data)
    return img, problem


_SOURCE_ATTR = "_hired_source_bytes"  # an attribute PIL never reads or saves (not ``info``)


def source_bytes(image: Image.Image):
    """The encoded bytes ``image`` was decoded from by ``decode_image`` (decoding them
    again gives the same RGB pixels), or None (an image given as pixels, not bytes)."""
    return getattr(image, _SOURCE_ATTR, None)


IMAGE_FETCH_TRIES = 2  # a read that times out is tried once more (a stalled connection, not a dead URL)
# Rows of one preprocessing batch whose images are read (and decoded) at once: a URL that
# hangs holds its own row for its tries, not the rows after it. Costs the batch's decoded
# images held together (at most the preprocessing batch, 16 rows).
IMAGE_READ_THREADS = 8


def _read_url(url: str, limits: DecodeLimits, storage_options: dict):
    """Bytes behind a local path or fsspec URL, or an error naming the redacted URL.
    Only the exception type is reported: messages from HTTP/S3 clients can echo the
    full URL, query string (signature) included. Each try may take ``limits.image_timeout``
    seconds (``_fetch_within``); ``IMAGE_FETCH_TRIES`` tries, then the row fails."""
    cap = limits.max_file_bytes
    options = storage_options if url.startswith("s3://") else _http_options(url, limits.image_timeout)
    if not _remote(url):  # a local file: read here (a thread per row would buy nothing)
        data, exc = _fetch(url, cap, options)
    else:
        outcome = _fetch_tries(url, cap, options, limits.image_timeout)
        if outcome is None:
            return None, _error(
                IMAGE_ERROR_PREFIX,
                f"timed out after {limits.image_timeout:g} s ({IMAGE_FETCH_TRIES} tries): {redact_url(url)}",
            )
        data, exc = outcome
    if exc is not None:  # missing keys, 403s, DNS, bad schemes...
        return None, _error(IMAGE_ERROR_PREFIX, f"cannot open {redact_url(url)}: {type(exc).__name__}")
    if len(data) > cap:
        return None, _error(IMAGE_ERROR_PREFIX, f"file too large (> {cap} bytes): {redact_url(url)}")
    return data, None


def _http_options(url: str, timeout: float) -> dict:
    """An http(s) client whose own requests give up, so a read abandoned by
    ``_fetch_within`` ends soon after instead of holding a connection for minutes. Twice
    ``timeout``: the deadline must come first, because fsspec reports the client's own
    timeout as FileNotFoundError, which would hide that the URL timed out."""
    if not url.startswith(("http://", "https://")):
        return {}
    try:
        import aiohttp
    except ImportError:  # fsspec's http client needs it: the row's error will say so
        return {}
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=2 * timeout)}}


def _remote(url: str) -> bool:
    """A URL read over the network (http(s), s3, ...), which can hang; not a local path."""
    return "://" in url and not url.startswith("file://")


def _fetch(url: str, cap: int, options: dict):
    """(data, None) with at most ``cap + 1`` bytes of ``url``, or (None, the exception)."""
    try:
        with fsspec.open(url, "rb", **options) as f:
            return f.read(cap + 1), None
    except Exception as exc:  # noqa: BLE001 -- missing keys, 403s, DNS, bad schemes: reported by type
        return None, exc


def _fetch_tries(url: str, cap: int, options: dict, timeout: float):
    """``_fetch``'s (data, exception) from the first of ``IMAGE_FETCH_TRIES`` tries that
    finishes within ``timeout`` seconds; None if every one timed out."""
    for _ in range(IMAGE_FETCH_TRIES):
        outcome = _fetch_within(url, cap, options, timeout)
        if outcome is not None:
            return outcome
    return None


def _fetch_within(url: str, cap: int, options: dict, timeout: float):
    """``_fetch`` run in a daemon thread given ``timeout`` seconds; None if it did not
    finish: a read that hangs (a server that never answers, a stalled S3 connection) is
    left behind, and the row, with the rows after it in its batch, goes on."""
    import threading

    result = []
    worker = threading.Thread(target=lambda: result.append(_fetch(url, cap, options)), name="image-fetch", daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else None


def _decode_path(path, limits: DecodeLimits, storage_options: dict):
    path = os.fsdecode(path)  # str, bytes or PathLike -> str
    if not path.strip():
        return _image_error("empty image (empty path)")
    data, problem = _read_url(path, limits, storage_options)
    if problem:
        return None, problem
    return _decode_bytes(data, limits)


def _decode_struct(value: dict, limits: DecodeLimits, storage_options: dict):
    """HF ``Image`` feature struct: embedded bytes win, the path is the fallback."""
    data, path = value.get("bytes"), value.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
        return _decode_bytes(data, limits)
    if not _is_null(data) and not isinstance(data, (bytes, bytearray, memoryview)):
        return _image_error(f"struct 'bytes' has type {type(data).__name__}, expected bytes")
    if isinstance(path, str) and path.strip():
        return _decode_path(path, limits, storage_options)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _decode_bytes(data, limits)  # 0 bytes and no path: said as for raw bytes
    return _image_error("empty image (struct has neither bytes nor path)")


def _decode_array(value: np.ndarray, limits: DecodeLimits):
    """(H, W) or (H, W, 1|3|4) uint8, as Ray Data's image reader produces."""
    if value.dtype != np.uint8:
        return _image_error(f"array dtype {value.dtype} unsupported (expected uint8)")
    if value.ndim == 3 and value.shape[2] == 1:
        value = value[:, :, 0]
    if not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))):
        return _image_error(f"array shape {value.shape} unsupported (expected HxW or HxWx3/4)")
    if value.size == 0:
        return _image_error(f"empty image (array shape {value.shape})")
    height, width = value.shape[:2]
    problem = _check_size(width, height, limits)
    if problem:
        return _image_error(problem)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(value))), None


_warned_truncated = False


def _warn_if_truncated_allowed() -> None:
    """Someone else may have set LOAD_TRUNCATED_IMAGES; we cannot undo that for them."""
    global _warned_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled by another module: "
            "truncated images will decode with grey filler instead of failing"
        )


def _check_args(limits, storage_options) -> None:
    if not isinstance(limits, DecodeLimits):
        raise TypeError(f"limits must be a DecodeLimits, got {type(limits).__name__}")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"storage_options must be a dict or None, got {type(storage_options).__name__}")


def decode_image(
    value, *, limits: DecodeLimits = DecodeLimits(), storage_options: dict | None = None
) -> tuple[Image.Image | None, str | None]:
    """Decode one image cell to an RGB ``PIL.Image``.

    ``value`` may be raw ``bytes``/``bytearray``/``memoryview``; an HF image struct
    ``{"bytes": ..., "path": ...}`` (bytes preferred); a ``str`` path or URL (local,
    ``file://``, ``s3://``, ``http(s)://``, opened with ``fsspec.open``; the job's
    ``storage_options`` are S3 options (endpoint, caching) and go to ``s3://`` URLs only:
    an http(s) client would reject an S3 endpoint; a URL read that takes longer than
    ``limits.image_timeout`` is tried once more, then the row is an error row); a
    ``PIL.Image``; or a uint8 ``numpy`` array.

    Returns ``(image, None)`` or ``(None, "image: <short specific reason>")``; never
    raises for bad data. Raises ``TypeError`` for a bad ``limits``/``storage_options``.
    """
    _check_args(limits, storage_options)
    _warn_if_truncated_allowed()
    options = storage_options or {}
    if _is_null(value):
        return _image_error("empty image (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(value, limits)
    if isinstance(value, dict):
        return _decode_struct(value, limits, options)
    if isinstance(value, (str, os.PathLike)):
        return _decode_path(value, limits, options)
    if isinstance(value, Image.Image):
        return _finish(value, limits, owned=False)
    if isinstance(value, np.ndarray):
        return _decode_array(value, limits)
    return _image_error(
        f"unsupported value type {type(value).__name__} "
        "(expected bytes, {bytes, path} struct, path/URL str or PIL image)"
    )


# ---------------------------------------------------------------------- question input


def decode_images(values, *, limits: DecodeLimits = DecodeLimits(), storage_options: dict | None = None) -> list:
    """``decode_image`` of each of ``values``, up to ``IMAGE_READ_THREADS`` at once, in order:
    per value (image, error, seconds it took, exception it raised or None), so one hanging
    URL or one unexpected failure stays that value's."""
    from concurrent.futures import ThreadPoolExecutor

    def one(value):
        t0 = time.perf_counter()
        try:
            image, err = decode_image(value, limits=limits, storage_options=storage_options)
            return image, err, time.perf_counter() - t0, None
        except Exception as exc:  # noqa: BLE001 - the caller makes it that row's error
            return None, None, time.perf_counter() - t0, exc

    values = list(values)
    with ThreadPoolExecutor(max_workers=max(1, min(IMAGE_READ_THREADS, len(values)))) as pool:
        return list(pool.map(one, values))


def validate_question(value, *, limits: DecodeLimits = DecodeLimits()) -> tuple[str | None, str | None]:
    """Check one question cell.

    Returns ``(stripped question, None)`` or ``(None, "question: <reason>")``. None, NaN,
    empty and whitespace-only values are errors; ``bytes`` are accepted if valid UTF-8.
    Raises ``TypeError`` only for a bad ``limits``.
    """
    _check_args(limits, None)
    if _is_null(value):
        return None, _error(QUESTION_ERROR_PREFIX, "missing (null)")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, _error(QUESTION_ERROR_PREFIX, "not valid UTF-8 text")
    if not isinstance(value, str):
        return None, _error(QUESTION_ERROR_PREFIX, f"expected text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return None, _error(QUESTION_ERROR_PREFIX, "empty (blank or whitespace only)")
    if len(text) > limits.max_question_chars:
        return None, _error(
            QUESTION_ERROR_PREFIX, f"too long ({len(text)} chars > max_question_chars {limits.max_question_chars})"
        )
    return text, None


# ------------------------------------------------------------------- synthetic images


def image_to_bytes(img: Image.Image) -> bytes:
    """PNG bytes of ``img`` (lossless, so a round trip through ``decode_image`` is exact)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _random_color(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def make_synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture of a few coloured rectangles, ellipses and lines on a
    plain background: same (width, height, seed), same pixels. For demos and benchmarks,
    where real datasets cannot be downloaded."""
    if not (isinstance(width, int) and isinstance(height, int) and width >= 1 and height >= 1):
        raise ValueError(f"width and height must be ints >= 1, got {width!r} x {height!r}")
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), _random_color(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, x1 = sorted(rng.randrange(width) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height) for _ in range(2))
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "line":
            draw.line((x0, y0, x1, y1), fill=_random_color(rng), width=max(1, min(width, height) // 50))
        else:
            getattr(draw, shape)((x0, y0, x1, y1), fill=_random_color(rng))
    return img
