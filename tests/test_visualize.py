"""``hired-batch visualize``: the pure layout helpers, then PNGs from the tiny checkpoints.

PNG sizes are fixed by the layout: a panel is 336 px drawn 1:1 with 12 px margins and a
30 px title, under an 84 px header (see ``visualize.figure_pixels``). The tiny
LLaVA-NeXT has the real anyres pinpoints, so a 900x400 image gets a 1x3 grid (full
image + 3 sub-images in one row) and a 300x800 image a 3x1 grid.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from hired_batch.cli import build_parser, main
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.eval import visualize as vz

WIDE = (900, 400)  # (width, height) -> grid (1, 3): 336x1008 canvas, 126 px pads left/right
TALL = (300, 800)  # -> grid (3, 1): 1008x336 canvas, 56 px pads top/bottom

# --------------------------------------------------------------------------- pure helpers


def test_partition_layout_puts_full_image_left_and_subs_row_major():
    assert vz.partition_layout(None) == [(0, 0)]
    assert vz.partition_layout((1, 3)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert vz.partition_layout((3, 1)) == [(0, 0), (0, 1), (1, 1), (2, 1)]
    assert vz.partition_layout((2, 2)) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]


def test_figure_pixels():
    assert vz.figure_pixels(None) == (360, 462)
    assert vz.figure_pixels((1, 3)) == (1440, 462)
    assert vz.figure_pixels((3, 1)) == (720, 1218)
    assert vz.figure_pixels((2, 2)) == (1080, 840)


def test_panel_rect_is_336_px_under_header_and_title():
    fig_px = vz.figure_pixels((1, 2))  # (1080, 462)
    left, bottom, width, height = vz.panel_rect((0, 2), fig_px)
    assert left * 1080 == pytest.approx(2 * 360 + 12)
    assert (1 - bottom - height) * 462 == pytest.approx(84 + 30)  # top edge, px from the top
    assert (width * 1080, height * 462) == pytest.approx((336, 336))


def test_patch_boxes_are_crop_pixel_squares_in_raster_order():
    mask = np.zeros(576, dtype=bool)
    mask[[0, 25, 575]] = True  # (row 0, col 0), (row 1, col 1), (row 23, col 23)
    assert vz.patch_boxes(mask) == [(0, 0, 14, 14), (14, 14, 14, 14), (322, 322, 14, 14)]
    assert vz.patch_boxes(np.zeros(576, dtype=bool)) == []
    assert vz.patch_boxes([True, False, False, True], side=2, patch=7) == [(0, 0, 7, 7), (7, 7, 7, 7)]
    with pytest.raises(ValueError, match="576"):
        vz.patch_boxes(np.ones(100, dtype=bool))


def test_token_shading_dims_dropped_and_shades_padding():
    keep = np.array([True, False, False, False])
    valid = np.array([True, True, False, False])
    shade = vz.token_shading(keep, valid, side=2)
    assert shade.shape == (2, 2, 4)
    assert shade[0, 0, 3] == 0  # kept: drawn as is
    assert tuple(shade[0, 1]) == vz.DIM_RGBA
    assert tuple(shade[1, 0]) == tuple(shade[1, 1]) == vz.PAD_RGBA


def test_mask_from_indices_and_denormalize():
    mask = vz.mask_from_indices([1, 4, 5], n_parts=2, n_tokens=4)
    assert mask.tolist() == [[False, True, False, False], [True, True, False, False]]
    with pytest.raises(ValueError, match="another model"):
        vz.mask_from_indices([8], n_parts=2, n_tokens=4)
    rgb = np.array([[[0, 128, 255]]], dtype=np.uint8)  # (1, 1, 3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    pixels = (rgb.transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert vz.denormalize(pixels, mean, std).tolist() == rgb.tolist()


def test_parser_registers_visualize():
    args = build_parser().parse_args(["visualize", "x.png", "--model", "m", "--out", "o.png"])
    assert args.func is vz._run
    assert (args.budget, args.selector, args.mode, args.alpha) == (0.2, "hired", "exact", 0.5)


# --------------------------------------------------------------------------- PNGs


def _image(tmp_path, size):
    """Warm colours only, so any clearly blue pixel in the PNG is the padding shade."""
    img = Image.new("RGB", size, (230, 150, 40))
    ImageDraw.Draw(img).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(150, 20, 20))
    path = tmp_path / f"in_{size[0]}x{size[1]}.png"
    img.save(path)
    return str(path)


def _rgb_at(png, panel_x, row, col):
    """Colour at the centre of token (row, col) of the panel whose left edge is panel_x
    (first panel row: top edge under the header and the title); patch outlines never
    reach a centre."""
    x, y = panel_x + 14 * col + 7, vz.HEADER_PX + vz.TITLE_PX + 14 * row + 7
    return np.asarray(Image.open(png).convert("RGB"))[y, x].astype(int)


def _is_padding_blue(rgb) -> bool:
    """Processor padding is black; the padding shade turns it a clear blue."""
    r, g, b = rgb
    return b > r + 60 and b > g + 40


def test_visualize_wide_image(tiny_next, tmp_path, capsys):
    out = tmp_path / "figs" / "wide.png"
    code = main(
        [
            "visualize",
            _image(tmp_path, WIDE),
            "--model",
            str(tiny_next),
            "--budget",
            "0.2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith(f"wrote {out} (sent 461 / "), printed  # round(0.2 * 4 * 576), exact mode
    png = Image.open(out)
    assert png.format == "PNG" and png.size == (1440, 462)
    # sub-image (0, 0) sits in panel column 1 (x from 372); its left 126 px are padding
    assert all(_is_padding_blue(_rgb_at(out, 372, 12, c)) for c in range(9))
    assert not _is_padding_blue(_rgb_at(out, 372, 12, 9))
    assert not _is_padding_blue(_rgb_at(out, 12, 12, 0))  # full image: no padding


def test_visualize_tall_image(tiny_next, tmp_path):
    out = tmp_path / "tall.png"
    assert (
        main(
            [
                "visualize",
                _image(tmp_path, TALL),
                "--model",
                str(tiny_next),
                "--question",
                "What is this?",
                "--mode",
                "reference",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (720, 1218)
    # sub-image (0, 0): panel (0, 1), top 4 token rows are padding (reference mode may
    # select some: outlined, still shaded)
    assert all(_is_padding_blue(_rgb_at(out, 372, r, 12)) for r in range(4))
    assert not _is_padding_blue(_rgb_at(out, 372, 4, 12))


def test_visualize_llava15_single_partition(tiny_llava, tmp_path, capsys):
    out = tmp_path / "l15.png"
    assert (
        main(
            [
                "visualize",
                _image(tmp_path, (640, 480)),
                "--model",
                str(tiny_llava),
                "--budget",
                "0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "sent 58 / 576" in capsys.readouterr().out  # round(0.1 * 576)
    assert Image.open(out).size == (360, 462)


def test_visualize_needs_exactly_one_source(tiny_llava, tmp_path, capsys):
    assert main(["visualize", "--model", str(tiny_llava), "--out", str(tmp_path / "x.png")]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert (
        main(["visualize", str(tmp_path / "missing.png"), "--model", str(tiny_llava), "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "image: " in capsys.readouterr().err


# --------------------------------------------------------------------------- --from-output


def _struct(img):
    return {"bytes": image_to_bytes(img), "path": None}


def _output(tmp_path, rows, **extra):
    """A job output: (id, kept_indices, n kept, error, image struct) rows, plus ``extra``
    columns (name -> values); ``kept_indices=False`` leaves that column out."""
    path = tmp_path / "job_out.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {
        "id": [r[0] for r in rows],
        "kept_indices": pa.array([r[1] for r in rows], pa.list_(pa.int64())),
        "n_visual_tokens_kept": [r[2] for r in rows],
        "error": [r[3] for r in rows],
        "picture": pa.array([r[4] for r in rows], image_type),
    }
    if extra.pop("kept_indices", True) is False:
        del columns["kept_indices"]
    pq.write_table(pa.table({**columns, **extra}), path)
    return str(path)


def test_from_output_draws_one_png_per_row(tiny_next, tmp_path, capsys):
    wide, tall = make_synthetic_image(*WIDE, seed=1), make_synthetic_image(*TALL, seed=2)
    path = _output(
        tmp_path,
        [
            ("a/1", [0, 5, 600, 1200, 1800], 5, None, _struct(wide)),  # P = 4: indices < 2304
            ("b", None, None, "image: truncated file", None),  # error row: skipped
            ("c", list(range(0, 2304, 7)), 330, None, _struct(tall)),
            ("d", [1], 1, None, _struct(wide)),  # beyond --rows 2
        ],
    )
    out_dir = tmp_path / "pngs"
    assert (
        main(
            [
                "visualize",
                "--from-output",
                path,
                "--rows",
                "2",
                "--image-column",
                "picture",
                "--model",
                str(tiny_next),
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "skipped row id='b': image: truncated file" in printed
    assert sorted(p.name for p in out_dir.iterdir()) == ["row0000_a_1.png", "row0001_c.png"]
    assert Image.open(out_dir / "row0000_a_1.png").size == (1440, 462)
    assert Image.open(out_dir / "row0001_c.png").size == (720, 1218)


def test_from_output_panels_match_saved_indices(tiny_next, tmp_path):
    from hired_batch.config import ModelConfig
    from hired_batch.engine.hf import HiredEngine

    engine = HiredEngine.load(ModelConfig(path=str(tiny_next), device="cpu"))
    panels = vz.panels_from_indices(engine, make_synthetic_image(*WIDE, seed=1), [0, 577, 2303], 3, "t")
    assert panels.grid == (1, 3) and panels.crops.shape == (4, 336, 336, 3)
    assert np.flatnonzero(panels.keep.reshape(-1)).tolist() == [0, 577, 2303]
    assert (panels.kept, panels.full) == (3, engine.full_count((400, 900)))
    assert panels.valid[1].sum() == 15 * 24  # 9 of 24 token columns are padding
    with pytest.raises(ValueError, match="another model"):
        vz.panels_from_indices(engine, make_synthetic_image(*WIDE, seed=1), [2304], 1, "t")


def test_from_output_names_missing_columns_before_loading_weights(tmp_path, capsys):
    # no model at all: the columns are checked first, so the error is about them
    no_model = str(tmp_path / "no-such-model")
    path = _output(tmp_path, [("a", [0], 1, None, _struct(make_synthetic_image(*WIDE, seed=1)))])
    assert (
        main(["visualize", "--from-output", path, "--model", no_model, "--out", str(tmp_path / "o")]) == 2
    )  # default --image-column image
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "missing column(s) ['image']" in err and "picture" in err and "--keep-column image" in err
    assert "no-such-model" not in err
    path = _output(tmp_path, [("a", None, 1, None, _struct(make_synthetic_image(*WIDE, seed=1)))], kept_indices=False)
    assert (
        main(
            [
                "visualize",
                "--from-output",
                path,
                "--model",
                no_model,
                "--image-column",
                "picture",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "missing column(s) ['kept_indices']" in err and "--save-indices" in err


@pytest.mark.slow
@pytest.mark.parametrize("endpoint_from", ["flag", "AWS_ENDPOINT_URL_S3"])
def test_from_output_reads_s3_through_the_jobs_client(tmp_path, capsys, monkeypatch, endpoint_from):
    """--from-output s3://... reaches S3 the way run and score do (--s3-endpoint, or
    AWS_ENDPOINT_URL_S3 alone): the columns it names missing are those of the object
    uploaded there, read before any weights."""
    pytest.importorskip("moto.server")
    from support.moto_output import output_on_s3

    local = _output(tmp_path, [("a", [0], 1, None, _struct(make_synthetic_image(*WIDE, seed=1)))])
    argv = [
        "visualize",
        "--from-output",
        "s3://jobs/run1",
        "--model",
        str(tmp_path / "no-such-model"),
        "--out",
        str(tmp_path / "o"),
    ]
    with output_on_s3(monkeypatch, local) as endpoint:
        if endpoint_from == "flag":
            code = main([*argv, "--s3-endpoint", endpoint])
        else:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "missing column(s) ['image']" in err and "picture" in err, err


def _spy_on_draw(monkeypatch):
    """The Panels each PNG is drawn from, in order (draw itself still runs)."""
    seen, real = [], vz.draw
    monkeypatch.setattr(vz, "draw", lambda panels, path: seen.append(panels) or real(panels, path))
    return seen


def test_from_output_header_has_selection_question_answer_and_says_when_rows_run_out(
    tiny_next, tmp_path, capsys, monkeypatch
):
    wide = _struct(make_synthetic_image(*WIDE, seed=1))
    path = _output(
        tmp_path,
        [("a", [0, 5], 2, None, wide), ("b", None, None, "image: truncated file", None), ("c", [1], 1, None, wide)],
        selector=["hired", None, "hired"],
        mode=["exact", None, "exact"],
        budget=[0.2, 0.2, 0.2],
        answer=["a red circle", None, "two"],
        question=["What is it?", "Why?", "How many?"],
    )
    seen = _spy_on_draw(monkeypatch)
    assert (
        main(
            [
                "visualize",
                "--from-output",
                path,
                "--rows",
                "5",
                "--image-column",
                "picture",
                "--model",
                str(tiny_next),
                "--out",
                str(tmp_path / "pngs"),
            ]
        )
        == 0
    )
    first = vz.header_lines(seen[0], vz.figure_pixels(seen[0].grid)[0] - 2 * vz.MARGIN)
    assert first[0] == "selector hired, mode exact, budget 0.2 | job_out.parquet, row id=a"
    assert first[1] == "Q: What is it?   A: a red circle"
    assert first[2].startswith("visual tokens sent: 2 of ")
    out = capsys.readouterr().out
    assert len(seen) == 2
    assert (
        "drew 2 of the 5 rows asked (--rows 5): " in out
        and "has no more rows with kept_indices, 1 row(s) without kept_indices skipped" in out
    )


def test_single_image_header_shows_the_question(tiny_llava, tmp_path, monkeypatch):
    seen = _spy_on_draw(monkeypatch)
    assert (
        main(
            [
                "visualize",
                _image(tmp_path, (640, 480)),
                "--model",
                str(tiny_llava),
                "--question",
                "Is there a\ncircle?",
                "--out",
                str(tmp_path / "q.png"),
            ]
        )
        == 0
    )
    lines = vz.header_lines(seen[0], 336)
    assert lines[0].startswith("selector hired, mode exact, budget 0.2") and lines[1] == "Q: Is there a circle?"


def test_qa_lines_share_one_line_when_they_fit_and_wrap_when_they_do_not():
    assert vz.qa_lines("What?", None, 336) == ["Q: What?"]
    assert vz.qa_lines("What?", "red", 336) == ["Q: What?   A: red"]
    answer = " ".join(["WWWW", "mmmm"] * 10)  # wide letters: ~5.5 px a character would not fit them
    lines = vz.qa_lines("What is it?", answer, 336)
    assert lines[0] == "Q: What is it?" and lines[1].startswith("A: WWWW")
    assert " ".join(lines[1:]) == "A: " + answer  # every word shown, none cut
    assert max(vz.text_px(line) for line in lines) <= 336
    one_word = vz.qa_lines("Q" * 30, "W" * 1000, 336)  # no space to break at, and too long to show
    assert len(one_word) == 1 + vz.MAX_ANSWER_LINES and one_word[-1].endswith("\u2026")
    assert max(vz.text_px(line) for line in one_word) <= 336


def _panels(answer, grid=None, color=(230, 150, 40)):
    """Panels of one uniform-colour partition (no model needed): every other token kept."""
    n_parts = len(vz.partition_layout(grid))
    crops = np.empty((n_parts, 336, 336, 3), np.uint8)
    crops[:] = color
    keep = np.zeros((n_parts, 576), bool)
    keep[:, ::2] = True
    return vz.Panels(
        crops,
        keep,
        np.ones((n_parts, 576), bool),
        grid,
        int(keep.sum()),
        576 * n_parts,
        "selector hired, mode exact, budget 0.5",
        question="What is in the picture?",
        answer=answer,
    )


def test_long_answer_is_wrapped_inside_the_png(tmp_path):
    answer = "$5 and $6 are prices, not math; " + "a very long answer that keeps going " * 5
    panels = _panels(answer)
    fig = vz.figure(panels)
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.texts if t.get_text()]
    assert len(texts) > vz.HEADER_LINES  # the answer took several lines
    width = fig.bbox.width
    for t in texts:
        box = t.get_window_extent(renderer)
        assert vz.MARGIN - 1 <= box.x0 and box.x1 <= width - vz.MARGIN + 1, (t.get_text(), box.x1, width)
    shown = " ".join(t.get_text() for t in texts)
    assert "A: " + answer.strip() in shown  # every word, as text ($ not parsed as mathtext)
    out = vz.draw(panels, tmp_path / "long.png")
    # the header grew by the extra lines: the panels keep their 336 px
    assert Image.open(out).size == vz.figure_pixels(None, len(texts))
    assert vz.figure_pixels(None, len(texts))[1] == vz.figure_pixels(None)[1] + (len(texts) - 3) * vz.LINE_PX


def test_dropped_legend_swatch_looks_like_the_dropped_patches(tmp_path):
    out = vz.draw(_panels("red"), tmp_path / "swatch.png")
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    dropped = _rgb_at(out, vz.MARGIN, 0, 1)  # token (0, 1) of the only panel: dropped, dimmed
    assert (np.abs(dropped - np.round(np.array([230, 150, 40]) * (1 - vz.DIM_RGBA[3]))) <= 2).all(), dropped
    header = png[: vz.HEADER_PX]
    swatch = (np.abs(header - dropped).max(axis=2) <= 3).sum()
    assert swatch >= 50, f"no legend swatch of the dropped patches' colour {dropped} in the header ({swatch} px)"


def test_padding_legend_swatch_has_the_colour_of_padding_in_the_panels(tiny_next, tmp_path):
    out = tmp_path / "wide.png"
    assert main(["visualize", _image(tmp_path, WIDE), "--model", str(tiny_next), "--out", str(out)]) == 0
    padding = _rgb_at(out, 372, 12, 0)  # sub-image (0, 0): its left token columns are padding
    assert _is_padding_blue(padding)
    header = np.asarray(Image.open(out).convert("RGB"))[: vz.HEADER_PX].astype(int)
    swatch = (np.abs(header - padding).max(axis=2) <= 3).sum()
    assert swatch >= 50, f"no legend swatch of colour {padding} in the header ({swatch} px)"


def test_reference_mode_draws_the_tokens_actually_sent(tiny_next):
    """A 1x3 image: the published packing stacks the sub-images and keeps a middle stripe."""
    from hired_batch.config import ModelConfig, SelectionConfig
    from hired_batch.engine.hf import HiredEngine

    image = make_synthetic_image(*WIDE, seed=1)  # 400 (h) x 900 (w) -> grid (1, 3)
    drawn = {}
    for mode in ("exact", "reference"):
        engine = HiredEngine.load(
            ModelConfig(path=str(tiny_next), device="cpu"), SelectionConfig(mode=mode, budget=0.2, save_indices=True)
        )
        panels = vz.panels_for_image(engine, image)
        vis = engine.encode([engine.pre(image, vz.DEFAULT_QUESTION)])
        assert int(panels.keep.sum()) == panels.kept == vis.counts[0]
        assert np.flatnonzero(panels.keep.reshape(-1)).tolist() == sorted(vis.indices[0])
        drawn[mode] = panels.keep
    # exact: every selected sub-image token is sent; reference: the 72x24 transposed canvas
    # cut to int(400 * 24/900) = 10 rows (pad 31) keeps only rows 7..16 of sub-image 2
    assert drawn["exact"][1:].sum(axis=1).min() > 0
    ref = drawn["reference"]
    assert ref[1].sum() == ref[3].sum() == 0
    rows = np.flatnonzero(ref[2].reshape(24, 24).any(axis=1))
    assert rows.min() >= 7 and rows.max() <= 16
    assert vz.mask_from_indices([0, -1, 5], n_parts=2, n_tokens=4).sum() == 2  # -1: a newline
