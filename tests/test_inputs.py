"""Tests for hired_batch.engine.inputs: every bad input is built in memory (or under tmp_path),
and S3 is a local moto server, so nothing here touches the network."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from hired_batch.config import ConfigError, DecodeLimits
from hired_batch.engine.inputs import (
    decode_image,
    image_to_bytes,
    make_synthetic_image,
    redact_url,
    validate_question,
)

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ----------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but which carries no pixel data: it can
    only be refused from the header, any attempt to decode it would fail differently."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def ok(value, **kwargs) -> Image.Image:
    img, err = decode_image(value, **kwargs)
    assert err is None, err
    assert img is not None and img.mode == "RGB"
    return img


def err_of(value, **kwargs) -> str:
    img, err = decode_image(value, **kwargs)
    assert img is None
    assert isinstance(err, str)
    assert err.startswith(("image: ",)), err
    assert "\n" not in err and len(err) < 200, err
    return err


def close(pixel, expected, tol=8) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# --------------------------------------------------------------------- accepted inputs


def test_png_bytes_round_trip_is_exact():
    src = noise_rgb()
    img = ok(image_to_bytes(src))
    assert img.size == src.size
    assert np.array_equal(np.asarray(img), np.asarray(src))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_values(wrap):
    assert ok(wrap(image_to_bytes(noise_rgb()))).size == (64, 48)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats(fmt):
    assert ok(encode(noise_rgb(), fmt)).size == (64, 48)


def test_hf_struct_prefers_bytes_over_path(tmp_path):
    data = image_to_bytes(noise_rgb())
    assert ok({"bytes": data, "path": str(tmp_path / "does-not-exist.png")}).size == (64, 48)


def test_hf_struct_falls_back_to_path(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(image_to_bytes(noise_rgb()))
    assert ok({"bytes": None, "path": str(path)}).size == (64, 48)
    assert ok({"bytes": b"", "path": str(path)}).size == (64, 48)


def test_local_path_file_url_and_pathlike(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(image_to_bytes(noise_rgb()))
    assert ok(str(path)).size == (64, 48)
    assert ok(f"file://{path}").size == (64, 48)
    assert ok(path).size == (64, 48)


def test_fsspec_memory_url():
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/hired-test/a.png", image_to_bytes(noise_rgb()))
    try:
        assert ok("memory://hired-test/a.png").size == (64, 48)
    finally:
        memory.rm("/hired-test", recursive=True)  # the memory filesystem is process-global


def test_pil_image_and_uint8_array_inputs():
    src = noise_rgb()
    assert np.array_equal(np.asarray(ok(src)), np.asarray(src))
    assert np.array_equal(np.asarray(ok(np.asarray(src))), np.asarray(src))
    grey = np.full((10, 12), 7, dtype=np.uint8)
    assert ok(grey).getpixel((0, 0)) == (7, 7, 7)
    assert err_of(np.zeros((10, 10), dtype=np.float32)).startswith("image: array dtype float32")
    assert err_of(np.zeros((10, 10, 2), dtype=np.uint8)).startswith("image: array shape")


def test_pil_input_is_not_mutated():
    src = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    ok(src)
    assert src.mode == "RGBA" and src.getpixel((0, 0)) == (255, 0, 0, 0)


# ------------------------------------------------------------------------ empty inputs


@pytest.mark.parametrize(
    "value, detail",
    [
        (None, "null"),
        (float("nan"), "null"),
        (b"", "0 bytes"),
        (bytearray(), "0 bytes"),
        ("", "empty path"),
        ("   ", "empty path"),
        ({}, "struct has neither bytes nor path"),
        ({"bytes": None, "path": None}, "struct has neither bytes nor path"),
        ({"bytes": b"", "path": ""}, "0 bytes"),
        ({"bytes": b"", "path": None}, "0 bytes"),
    ],
)
def test_empty_or_null_image(value, detail):
    assert err_of(value) == f"image: empty image ({detail})"


def test_unsupported_value_type_is_a_row_error():
    assert err_of(12345).startswith("image: unsupported value type int")
    assert err_of({"bytes": 5}).startswith("image: struct 'bytes' has type int")


# ----------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize("data", [b"hello world", b"\x00" * 100, b"%PDF-1.4\n...", b"GIF"])
def test_not_an_image(data):
    assert err_of(data) == "image: not an image (cannot identify format)"


def test_load_truncated_images_is_not_enabled():
    # the truncation tests below only mean something while this flag is off
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image(fmt, keep):
    data = encode(noise_rgb(128, 128), fmt)
    err = err_of(data[: int(len(data) * keep)])
    assert err.startswith("image: truncated image ("), err


def test_corrupt_pixel_data_is_reported_not_raised():
    data = bytearray(encode(noise_rgb(128, 128), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 200 : idat + 400] = b"\xff" * 200  # keep the header, wreck the zlib stream
    err = err_of(bytes(data))
    assert err.startswith(("image: corrupt image data (", "image: truncated image (")), err


def test_truncation_detected_even_if_only_the_header_survives():
    err = err_of(png_header_only(64, 64))
    assert err.startswith(("image: truncated image", "image: corrupt image data")), err


# ---------------------------------------------------------------------- size limits


def test_pixel_limit_refused_from_header_without_decoding(monkeypatch):
    calls = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1) or original(self))
    err = err_of(image_to_bytes(noise_rgb(20, 20)), limits=DecodeLimits(max_pixels=100))
    assert err == "image: too many pixels (20x20 = 400 px > max_pixels 100)"
    assert calls == []


def test_header_claiming_100m_pixels_is_refused_before_decoding(recwarn):
    # 10000 x 10000 is above PIL's warning threshold but below its error threshold:
    # our limit (64 M px) is what refuses it; the file has no pixel data at all
    err = err_of(png_header_only(10_000, 10_000))
    assert err == "image: too many pixels (10000x10000 = 100000000 px > max_pixels 64000000)"
    # the row is refused from the header: PIL's bomb warning would only be log noise
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decompression_bomb_warning_kept_when_our_limit_accepts_the_size():
    # --max-pixels above PIL's threshold: our check lets the header through, so PIL's
    # own guard still speaks (the header-only file then fails to decode)
    with pytest.warns(Image.DecompressionBombWarning):
        err = err_of(png_header_only(10_000, 10_000), limits=DecodeLimits(max_pixels=10**9))
    assert err.startswith(("image: truncated image", "image: corrupt image data")), err


def test_pil_decompression_bomb_error_becomes_a_row_error():
    # 30000 x 30000 trips PIL's own guard inside Image.open, even with a lax limit of ours
    err = err_of(png_header_only(30_000, 30_000), limits=DecodeLimits(max_pixels=10**10))
    assert err.startswith("image: too many pixels (PIL decompression-bomb guard: "), err


def test_decompression_bomb_warning_as_error_becomes_a_row_error():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        err = err_of(png_header_only(10_000, 10_000), limits=DecodeLimits(max_pixels=10**9))
    assert err.startswith("image: too many pixels (PIL decompression-bomb guard: "), err


def test_pil_globals_untouched():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own guard still speaks
        err_of(png_header_only(10_000, 10_000), limits=DecodeLimits(max_pixels=10**9))
    ok(image_to_bytes(noise_rgb()))
    assert Image.MAX_IMAGE_PIXELS == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_one_by_one_is_too_small():
    err = err_of(image_to_bytes(Image.new("RGB", (1, 1))))
    assert err == "image: too small (1x1 px, min side 2 px)"


def test_elongated_image_refused_with_sizes():
    err = err_of(image_to_bytes(Image.new("RGB", (2000, 10))))
    assert err == "image: aspect ratio too extreme (2000x10 px, 200.0 > max_aspect_ratio 50)"
    err = err_of(image_to_bytes(Image.new("RGB", (10, 2000))))
    assert "10x2000 px" in err


def test_limits_are_configurable():
    assert ok(image_to_bytes(Image.new("RGB", (1, 1))), limits=DecodeLimits(min_side=1)).size == (1, 1)
    wide = image_to_bytes(Image.new("RGB", (2000, 10)))
    assert ok(wide, limits=DecodeLimits(max_aspect_ratio=500)).size == (2000, 10)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pixels": 0}, {"min_side": -1}, {"max_aspect_ratio": 0.5}, {"max_question_chars": 1.5}, {"max_pixels": True}],
)
def test_bad_limits_raise(kwargs):
    with pytest.raises(ValueError):
        DecodeLimits(**kwargs)


# ---------------------------------------------------------------------- colour modes


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((255, 0, 0, 0), (0, 0, 8, 16))  # full cyan on the left half
    for fmt in ("JPEG", "TIFF"):
        img = ok(encode(cmyk, fmt))
        assert close(img.getpixel((12, 8)), WHITE), fmt
        assert close(img.getpixel((2, 8)), (0, 255, 255)), fmt


def palette_image(transparent: bool) -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    img.paste(1, (0, 0, 4, 8))
    return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def test_palette_without_transparency():
    img = ok(palette_image(transparent=False))
    assert img.getpixel((1, 1)) == RED and img.getpixel((6, 6)) == (0, 0, 0)


def test_palette_with_transparency_composites_on_white():
    assert Image.open(io.BytesIO(palette_image(True))).info.get("transparency") == 0
    img = ok(palette_image(transparent=True))
    assert img.getpixel((1, 1)) == RED and img.getpixel((6, 6)) == WHITE


def test_rgba_composites_on_white():
    src = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: white
    src.paste((255, 0, 0, 255), (0, 0, 4, 8))  # opaque red
    src.putpixel((7, 7), (0, 0, 0, 128))  # half-transparent black: mid grey
    img = ok(image_to_bytes(src))
    assert img.getpixel((1, 1)) == RED and img.getpixel((6, 1)) == WHITE
    assert close(img.getpixel((7, 7)), (127, 127, 127), tol=1)


def test_la_composites_on_white():
    src = Image.new("LA", (8, 8), (0, 0))
    src.paste((0, 255), (0, 0, 4, 8))
    img = ok(image_to_bytes(src))
    assert img.getpixel((1, 1)) == (0, 0, 0) and img.getpixel((6, 1)) == WHITE


def test_rgb_png_with_transparent_colour_key():
    src = Image.new("RGB", (8, 8), GREEN)
    src.paste(RED, (0, 0, 4, 8))
    img = ok(encode(src, "PNG", transparency=GREEN))
    assert img.getpixel((1, 1)) == RED and img.getpixel((6, 1)) == WHITE


def test_16bit_grey_png_is_scaled_not_clipped():
    samples = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(samples), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = ok(data)
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_32bit_int_grey_tiff_is_scaled_and_clipped_to_16bit_range():
    samples = np.array([[0, 32896, 65535, 100_000, -5]], dtype=np.int32).repeat(4, axis=0)
    data = encode(Image.fromarray(samples), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    img = ok(data)
    assert [img.getpixel((x, 0))[0] for x in range(5)] == [0, 128, 255, 255, 0]


@pytest.mark.parametrize("mode, fill, expected", [("L", 200, (200, 200, 200)), ("1", 1, WHITE), ("1", 0, (0, 0, 0))])
def test_grey_and_bilevel(mode, fill, expected):
    assert ok(image_to_bytes(Image.new(mode, (8, 8), fill))).getpixel((3, 3)) == expected


def test_unconvertible_mode_is_a_row_error():
    err = err_of(Image.new("La", (8, 8)))
    assert err.startswith("image: unsupported color mode La"), err


# ------------------------------------------------------------------ animation, EXIF


def animated(fmt: str, **kwargs) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)


@pytest.mark.parametrize("fmt, kwargs", [("GIF", {}), ("WEBP", {"lossless": True})])
def test_animated_images_give_first_frame(fmt, kwargs):
    data = animated(fmt, **kwargs)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = ok(data)
    assert img.size == (16, 16) and close(img.getpixel((8, 8)), RED)


@pytest.mark.parametrize("orientation, top_colour", [(6, RED), (8, BLUE)])
def test_exif_rotation(orientation, top_colour):
    src = Image.new("RGB", (80, 40), BLUE)
    src.paste(RED, (0, 0, 40, 40))  # red left half, blue right half as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = ok(encode(src, "JPEG", exif=exif, quality=95))
    assert img.size == (40, 80)
    # 6: rotate 90 degrees clockwise to display (left goes to top); 8: the opposite
    assert close(img.getpixel((20, 5)), top_colour, tol=20)


def test_broken_exif_keeps_the_image():
    src = noise_rgb()
    img = ok(encode(src, "JPEG", exif=b"Exif\x00\x00garbage-not-tiff"))
    assert img.size == src.size


# ---------------------------------------------------------------------- paths and URLs


def test_missing_local_file(tmp_path):
    path = tmp_path / "missing.png"
    assert err_of(str(path)) == f"image: cannot open {path}: FileNotFoundError"
    assert err_of(f"file://{path}") == f"image: cannot open file://{path}: FileNotFoundError"


def test_directory_is_not_an_image(tmp_path):
    assert err_of(str(tmp_path)).startswith(f"image: cannot open {tmp_path}: ")


def test_missing_memory_url_drops_query_string():
    err = err_of("memory://hired-test/missing.png?X-Amz-Signature=SECRET")
    assert err == "image: cannot open memory://hired-test/missing.png: FileNotFoundError"


def test_http_error_never_shows_credentials_or_query():
    # port 1 on loopback refuses at once; fsspec's own message echoes the full URL
    err = err_of("http://alice:hunter2@127.0.0.1:1/x.png?token=SECRET#frag")
    assert err.startswith("image: cannot open http://127.0.0.1:1/x.png: "), err
    for secret in ("alice", "hunter2", "token", "SECRET", "frag"):
        assert secret not in err


@pytest.fixture
def silent_port():
    """A 127.0.0.1 port that takes connections (the kernel's backlog) and never answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.mark.slow
def test_url_that_never_answers_times_out_after_two_tries(silent_port):
    url = f"http://127.0.0.1:{silent_port}/img.png?X-Amz-Signature=SECRET"
    err = err_of(url, limits=DecodeLimits(image_timeout=0.5))
    assert err == f"image: timed out after 0.5 s (2 tries): http://127.0.0.1:{silent_port}/img.png"


@pytest.mark.slow
def test_s3_object_that_never_arrives_times_out(silent_port, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    err = err_of(
        "s3://bucket/img.png",
        limits=DecodeLimits(image_timeout=0.5),
        storage_options={"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{silent_port}"}},
    )
    assert err == "image: timed out after 0.5 s (2 tries): s3://bucket/img.png"


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "30", True])
def test_image_timeout_must_be_positive_seconds(timeout):
    with pytest.raises(ConfigError, match="image_timeout must be a number of seconds > 0"):
        DecodeLimits(image_timeout=timeout)


def test_unknown_scheme_is_a_row_error():
    assert err_of("nosuchproto://x/y.png").startswith("image: cannot open nosuchproto://x/y.png: ")


def test_long_path_is_shortened(tmp_path):
    path = str(tmp_path / ("d" * 200) / ("e" * 200) / "missing.png")
    err = err_of(path)
    assert err.endswith("missing.png: FileNotFoundError") and "..." in err


def test_file_larger_than_any_acceptable_image_is_not_read(tmp_path):
    path = tmp_path / "big.bin"
    limits = DecodeLimits(max_pixels=4, min_side=1)
    path.write_bytes(b"\x00" * (limits.max_file_bytes + 1))
    assert err_of(str(path), limits=limits) == (f"image: file too large (> {limits.max_file_bytes} bytes): {path}")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("s3://bucket/key.jpg", "s3://bucket/key.jpg"),
        (
            "https://user:pass@host.example/a/b.png?X-Amz-Signature=abc&X-Amz-Credential=k",
            "https://host.example/a/b.png",
        ),
        ("http://host:8080/p.png#frag", "http://host:8080/p.png"),
        ("http://[bad/p.png?sig=1", "http://[bad/p.png"),
        ("/local/path.png", "/local/path.png"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    server.stop()


def test_s3_read_and_missing_key(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_endpoint)
    fs.mkdir("hired-bucket")
    fs.pipe("hired-bucket/ok.png", image_to_bytes(noise_rgb()))
    assert ok("s3://hired-bucket/ok.png", storage_options=s3_endpoint).size == (64, 48)
    assert err_of("s3://hired-bucket/nope.png", storage_options=s3_endpoint) == (
        "image: cannot open s3://hired-bucket/nope.png: FileNotFoundError"
    )


# ------------------------------------------------------------------- argument errors


def test_wrong_argument_types_raise():
    data = image_to_bytes(noise_rgb())
    with pytest.raises(TypeError):
        decode_image(data, limits={"max_pixels": 10})
    with pytest.raises(TypeError):
        decode_image(data, storage_options=["anon"])
    with pytest.raises(TypeError):
        validate_question("why?", limits=None)


# -------------------------------------------------------------------------- fuzzing


SEEDS = [encode(noise_rgb(24, 16), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL complains about mangled TIFF tags
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    cut=st.integers(0, 4000),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
)
def test_mangled_images_never_raise(seed, cut, edits):
    data = bytearray(seed[: max(1, len(seed) - cut)] if cut % 3 == 0 else seed)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    img, err = decode_image(bytes(data))
    assert (img is None) != (err is None)
    if err is not None:
        assert err.startswith("image: ") and "\n" not in err and len(err) < 200, err
    else:
        assert img.mode == "RGB"


# ------------------------------------------------------------------------ questions


def test_question_is_stripped():
    assert validate_question("  What is in the image?\n") == ("What is in the image?", None)
    assert validate_question("Wie viele Äpfel?".encode()) == ("Wie viele Äpfel?", None)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "question: missing (null)"),
        (float("nan"), "question: missing (null)"),
        (np.float32("nan"), "question: missing (null)"),
        ("", "question: empty (blank or whitespace only)"),
        (" \t\n ", "question: empty (blank or whitespace only)"),
        (42, "question: expected text, got int"),
        (b"\xff\xfe\xfa", "question: not valid UTF-8 text"),
    ],
)
def test_bad_questions(value, expected):
    assert validate_question(value) == (None, expected)


def test_question_too_long():
    limits = DecodeLimits(max_question_chars=10)
    assert validate_question("  0123456789  ", limits=limits) == ("0123456789", None)
    assert validate_question("01234567890", limits=limits) == (
        None,
        "question: too long (11 chars > max_question_chars 10)",
    )


def test_pandas_na_is_null():
    pd = pytest.importorskip("pandas")
    assert validate_question(pd.NA) == (None, "question: missing (null)")
    assert err_of(pd.NA) == "image: empty image (null)"


# ------------------------------------------------------------------ synthetic images


def test_synthetic_image_is_deterministic():
    a = make_synthetic_image(96, 64, seed=3)
    assert a.mode == "RGB" and a.size == (96, 64)
    assert image_to_bytes(a) == image_to_bytes(make_synthetic_image(96, 64, seed=3))
    assert image_to_bytes(a) != image_to_bytes(make_synthetic_image(96, 64, seed=4))
    assert len(np.unique(np.asarray(a).reshape(-1, 3), axis=0)) > 1  # shapes, not a blank canvas


def test_synthetic_image_decodes():
    img = make_synthetic_image(33, 17, seed=0)
    assert np.array_equal(np.asarray(ok(image_to_bytes(img))), np.asarray(img))


def test_synthetic_image_rejects_bad_sizes():
    with pytest.raises(ValueError):
        make_synthetic_image(0, 10, seed=0)
