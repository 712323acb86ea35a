"""The ``visualize`` subcommand: draw which visual tokens HiRED keeps, one PNG per image.

Each PNG shows the partitions the vision tower saw, as the model saw them (the pixel
values de-normalized, so the crops, the squashed full image and the anyres padding are
exactly the model's input): the full image on the left, then the sub-images in their
rows x cols grid. Kept 14x14 patches are outlined, dropped ones dimmed, padding tokens
(never sent by LLaVA-NeXT) painted blue. Titles give each partition's kept count; the
header gives the selection (selector, mode, budget), the question (and the answer, for a
job's output row) and the visual tokens sent against what stock LLaVA would send.

Two sources of masks:

- an image file: the engine runs the vision tower and the selector (``encode``) and the
  tokens it sends are drawn (in reference mode, what the published packing keeps);
- ``--from-output``: the ``kept_indices`` a job saved (flat ``p*N + j``), drawn over the
  image the output kept; the model is loaded only for the pixel geometry. The job must
  have run with ``--save-indices --keep-column IMAGE`` (and ``--keep-column QUESTION``
  to show the question): the columns are checked before any weights load.

The figure has a fixed pixel size per layout and number of header lines
(``figure_pixels``): one panel is drawn at 1:1 over the 336-px crop; a question or answer
too long for one line is wrapped (measured in the PNG's font), so the header grows. This module does not generate answers, write Parquet or
change any selection; it imports matplotlib, torch and transformers only when it draws.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import re
from dataclasses import dataclass

import numpy as np

from hired_batch.config import MODES, SELECTORS, ConfigError, ModelConfig, SelectionConfig

# Figure geometry, in output pixels (DPI pixels per inch). A panel is CROP px square.
DPI = 100
CROP = 336  # px per panel: the CLIP crop drawn 1:1
MARGIN = 12  # px left and right of each panel, and below it
TITLE_PX = 30  # px above each panel for its title
LINE_PX = 18  # px between header lines
HEADER_EXTRA_PX = 30  # px of the header besides its text lines: the top gap and the legend row
HEADER_LINES = 3  # header text lines when the question and answer share one line
FONT_PT = 9  # header text size
MAX_QUESTION_LINES = 3  # a longer question is wrapped onto at most this many lines, the last cut with "…"
MAX_ANSWER_LINES = 6  # likewise for the answer


def header_px(n_lines: int = HEADER_LINES) -> int:
    """Height of a header holding ``n_lines`` text lines and the legend."""
    return HEADER_EXTRA_PX + n_lines * LINE_PX


HEADER_PX = header_px()  # px at the top with three summary lines (84)

KEPT_COLOR = "#39ff14"  # outline of a kept patch (over a black halo: visible on any image)
HALO_WIDTH, LINE_WIDTH = 1.6, 0.8  # pt: the halo under a patch outline, and the outline
STRAY_COLOR = "#ff3030"  # outline of a kept patch in padding (reference mode drops it later)
HALO_COLOR = "black"
DIM_RGBA = (0.0, 0.0, 0.0, 0.62)  # over a dropped content patch
MERGED_RGBA = (0.0, 0.55, 0.85, 0.45)  # over a patch merged into a contextual token (VisionZip), not dropped
NEW = -2  # in kept_indices: a vector the selector made (a CLS state or a merged token), no patch of its own
# over a padding token. Opaque: padding holds no image, and the legend swatch (drawn on
# the white figure) then shows exactly the colour of the padding in the panels.
PAD_RGBA = (0.08, 0.19, 0.52, 1.0)

DEFAULT_QUESTION = "Describe the image."


# --------------------------------------------------------------------------- layout (pure)


def figure_shape(grid) -> tuple[int, int]:
    """(panel rows, panel columns): the full image in column 0, sub-images after it."""
    if grid is None:
        return 1, 1
    rows, cols = grid
    return rows, 1 + cols


def partition_layout(grid) -> list[tuple[int, int]]:
    """(row, col) panel position of each partition, partition order.

    Partition 0 (the full image) is top-left; sub-image k = r*cols + c (row-major, as
    LLaVA-NeXT orders the crops) sits at (r, 1 + c). ``grid`` None: LLaVA-1.5.
    """
    if grid is None:
        return [(0, 0)]
    rows, cols = grid
    return [(0, 0)] + [(r, 1 + c) for r in range(rows) for c in range(cols)]


def figure_pixels(grid, n_lines: int = HEADER_LINES) -> tuple[int, int]:
    """(width, height) of the saved PNG in pixels for a layout and ``n_lines`` header lines."""
    n_rows, n_cols = figure_shape(grid)
    return n_cols * (CROP + 2 * MARGIN), header_px(n_lines) + n_rows * (TITLE_PX + CROP + MARGIN)


def panel_rect(pos: tuple[int, int], fig_px: tuple[int, int], header: int = HEADER_PX) -> list[float]:
    """matplotlib axes rectangle [left, bottom, width, height] (figure fractions), under a
    header ``header`` px high."""
    r, c = pos
    width, height = fig_px
    left = c * (CROP + 2 * MARGIN) + MARGIN
    top = header + r * (TITLE_PX + CROP + MARGIN) + TITLE_PX
    return [left / width, 1 - (top + CROP) / height, CROP / width, CROP / height]


def patch_boxes(mask_row, side: int = 24, patch: int = 14) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) in crop pixels of every True token of a raster (side*side,) mask."""
    mask = np.asarray(mask_row, dtype=bool).reshape(-1)
    if mask.size != side * side:
        raise ValueError(f"mask row must hold side*side = {side * side} tokens, got {mask.size}")
    return [(int(j % side) * patch, int(j // side) * patch, patch, patch) for j in np.flatnonzero(mask)]


def token_shading(keep_row, valid_row, side: int = 24, merged: bool = False) -> np.ndarray:
    """RGBA (side, side, 4) overlay: dropped content dimmed (tinted when ``merged``: the
    tokens not kept went into contextual tokens), padding shaded, kept clear."""
    keep = np.asarray(keep_row, dtype=bool).reshape(side, side)
    valid = np.asarray(valid_row, dtype=bool).reshape(side, side)
    shade = np.zeros((side, side, 4))
    shade[valid & ~keep] = MERGED_RGBA if merged else DIM_RGBA
    shade[~valid] = PAD_RGBA
    return shade


def denormalize(pixels, mean, std) -> np.ndarray:
    """(3, H, W) normalized pixel values -> (H, W, 3) uint8 RGB."""
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]
    std = np.asarray(std, dtype=np.float32)[:, None, None]
    rgb = np.asarray(pixels, dtype=np.float32) * std + mean
    return (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def mask_from_indices(indices, n_parts: int, n_tokens: int) -> np.ndarray:
    """Bool (P, N) mask from flat p*N + j indices; ValueError if one is out of range.

    -1 entries (image-newline tokens in a stock LLaVA-NeXT ``kept_indices``) and -2
    entries (vectors a selector made: VisionZip's CLS states and merged tokens) hold no
    patch and are skipped.
    """
    flat = np.asarray(list(indices), dtype=np.int64)
    flat = flat[(flat != -1) & (flat != NEW)]
    if flat.size and (flat.min() < 0 or flat.max() >= n_parts * n_tokens):
        raise ConfigError(
            f"kept_indices must lie in [0, {n_parts * n_tokens}) for this image "
            f"({n_parts} partitions x {n_tokens} tokens), found {int(flat.min())}..{int(flat.max())}; "
            "was the output written with another model?"
        )
    mask = np.zeros(n_parts * n_tokens, dtype=bool)
    mask[flat] = True
    return mask.reshape(n_parts, n_tokens)


# --------------------------------------------------------------------------- what to draw


@dataclass
class Panels:
    """Everything one PNG shows, as numpy."""

    crops: np.ndarray  # (P, H, W, 3) uint8, the partitions as the model saw them
    keep: np.ndarray  # (P, N) bool keep-mask
    valid: np.ndarray  # (P, N) bool, False on anyres padding tokens
    grid: tuple[int, int] | None  # anyres (rows, cols); None for LLaVA-1.5
    kept: int  # visual tokens sent to the language model
    full: int  # visual tokens stock LLaVA sends (image-newlines included)
    caption: str  # where the mask came from (selector, budget / file, row id)
    question: str | None = None  # the row's question; None when it is not known
    answer: str | None = None  # a job's answer for the row; None when not generated
    merged: int = 0  # contextual tokens sent (VisionZip): the patches not kept were merged into them, not dropped


def merged_count(indices, n_parts: int) -> int:
    """Contextual tokens in a ``kept_indices`` row: its made vectors less one CLS state per
    partition, for a row that has made vectors (VisionZip); 0 otherwise."""
    made = sum(1 for i in indices if i == NEW)
    return made - n_parts if made else 0


def _geometry(engine, prepared):
    """(crops, valid, grid) of one prepared item: the engine's own geometry."""
    ip = engine.pre.processor.image_processor
    crops = np.stack([denormalize(p, ip.image_mean, ip.image_std) for p in prepared.pixel_values])
    grid = engine.grid_of(prepared.image_size)
    valid = engine.valid_of(prepared.image_size, grid).numpy()
    if len(crops) != len(partition_layout(grid)):
        raise ConfigError(
            f"expected {len(partition_layout(grid))} partitions for grid {grid}, the processor gave {len(crops)}"
        )
    return crops, valid, grid


def panels_for_image(engine, image, question: str = DEFAULT_QUESTION) -> Panels:
    """Run the vision tower and the engine's selector on one PIL image."""
    prepared = engine.pre(image, question)
    crops, valid, grid = _geometry(engine, prepared)
    vis = engine.encode([prepared])
    # Draw what reaches the language model, not the selection before packing: in
    # reference mode the published packing drops selected tokens (its transposed canvas).
    if engine.selector.needs.cls_state:  # VisionZip: the tokens it sent, made vectors included
        sent = vis.indices[0]
    else:
        sent = engine.packed_indices(vis.masks[0], tuple(prepared.image_size), grid, newline=False).tolist()
    keep = mask_from_indices(sent, len(crops), valid.shape[1])
    panels = Panels(crops, keep, valid, grid, vis.counts[0], vis.full_counts[0], _caption(engine.selection))
    return dataclasses.replace(panels, merged=merged_count(sent, len(crops)))


def panels_from_indices(engine, image, indices, kept: int, caption: str) -> Panels:
    """A saved ``kept_indices`` row drawn over its image."""
    prepared = engine.pre(image, DEFAULT_QUESTION)  # the question does not change the pixels
    crops, valid, grid = _geometry(engine, prepared)
    keep = mask_from_indices(indices, len(crops), valid.shape[1])
    panels = Panels(crops, keep, valid, grid, kept, engine.full_count(prepared.image_size), caption)
    return dataclasses.replace(panels, merged=merged_count(indices, len(crops)))


def _caption(sel) -> str:
    budget = f"{sel.budget_tokens} tokens" if sel.budget_tokens is not None else f"{sel.budget:g}"
    return selection_text(sel.selector, sel.mode, budget, f"{sel.alpha:g}")


def selection_text(selector: str, mode: str, budget: str, alpha: str | None = None) -> str:
    """ "selector S, mode M, budget B[, alpha A]", or stock LLaVA for ``full``."""
    if selector == "full":
        return "selector full (stock LLaVA)"
    return f"selector {selector}, mode {mode}, budget {budget}" + (f", alpha {alpha}" if alpha else "")


# --------------------------------------------------------------------------- drawing


def panel_title(p: int, grid, keep_row, valid_row, padding_sent: bool = False) -> str:
    """ "name: kept / content tokens" of one partition; kept padding tokens noted apart
    (``padding_sent``: VisionZip sends them, it does not unpad)."""
    kept = int((keep_row & valid_row).sum())
    if p == 0:
        name = "image" if grid is None else "full image"  # LLaVA-1.5: one centre crop
    else:
        name = f"sub-image r{(p - 1) // grid[1]} c{(p - 1) % grid[1]}"
    title = f"{name}: {kept} kept / {int(valid_row.sum())}"
    stray = int((keep_row & ~valid_row).sum())
    if stray and padding_sent:
        return title + f" (+{stray} in padding)"
    return title + (f" (+{stray} in padding, dropped)" if stray else "")


def _draw_boxes(ax, boxes, color: str, style: str = "solid") -> None:
    """Outlines inset by 1 px (neighbours stay apart), a dark halo under a bright line."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    for edge, width in ((HALO_COLOR, HALO_WIDTH), (color, LINE_WIDTH)):
        rects = [Rectangle((x + 1, y + 1), w - 2, h - 2) for x, y, w, h in boxes]
        ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=edge, linewidth=width, linestyle=style))


def _draw_panel(ax, crop, keep_row, valid_row, title: str, merged: bool = False) -> None:
    side = math.isqrt(keep_row.size)
    size = crop.shape[0]  # crop px; patch boxes are in these units
    ax.imshow(crop, extent=(0, size, size, 0), interpolation="nearest")
    ax.imshow(token_shading(keep_row, valid_row, side, merged), extent=(0, size, size, 0), interpolation="nearest")
    _draw_boxes(ax, patch_boxes(keep_row & valid_row, side, size // side), KEPT_COLOR)
    _draw_boxes(ax, patch_boxes(keep_row & ~valid_row, side, size // side), STRAY_COLOR, "dashed")
    ax.set_title(title, fontsize=8.5, pad=4)
    ax.set_axis_off()


def text_px(text: str, bold: bool = False) -> float:
    """Width in output pixels of ``text`` drawn in the header's font (measured by Agg, the
    renderer that saves the PNG, so a line that fits here fits there)."""
    from matplotlib.font_manager import FontProperties

    width, _, _ = _measurer().get_text_width_height_descent(
        text, FontProperties(size=FONT_PT, weight="bold" if bold else "normal"), ismath=False
    )
    return width


def _measurer():
    global _RENDERER
    if _RENDERER is None:
        from matplotlib.backends.backend_agg import RendererAgg

        _RENDERER = RendererAgg(1, 1, DPI)
    return _RENDERER


_RENDERER = None


def wrap_px(text: str, width_px: float, max_lines: int, measure=text_px) -> list[str]:
    """``text`` on one line per ``width_px``, broken between words (a word wider than a
    line, between characters); past ``max_lines`` the last line ends with "…"."""
    words = " ".join(str(text).split())[: max_lines * 400].split(" ")  # more could not be shown
    lines, line = [], ""
    for word in words:
        joined = f"{line} {word}" if line else word
        if measure(joined) <= width_px:
            line = joined
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and measure(word) > width_px:
            n = _fitting_prefix(word, width_px, measure)
            lines.append(word[:n])
            word = word[n:]
        line = word
    lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "\u2026") > width_px:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "\u2026"]
    return lines


def _fitting_prefix(word: str, width_px: float, measure) -> int:
    """The most leading characters of ``word`` that fit ``width_px`` (at least one)."""
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if measure(word[:mid]) <= width_px else (lo, mid - 1)
    return lo


def qa_lines(question: str | None, answer: str | None, width_px: float, measure=text_px) -> list[str]:
    """ "Q: ...   A: ..." on one line when it fits ``width_px``; else the question and then
    the answer, each wrapped (at most ``MAX_QUESTION_LINES`` / ``MAX_ANSWER_LINES``)."""
    q = "Q: " + ("(not in the output)" if question is None else " ".join(str(question).split()))
    a = None if answer is None else "A: " + " ".join(str(answer).split())
    if a is not None and measure(f"{q}   {a}") <= width_px:
        return [f"{q}   {a}"]
    lines = wrap_px(q, width_px, MAX_QUESTION_LINES, measure)
    return lines + (wrap_px(a, width_px, MAX_ANSWER_LINES, measure) if a is not None else [])


def header_lines(panels: Panels, width_px: float) -> list[str]:
    """The header's text lines: selection and source, question/answer, tokens sent, each
    fitting ``width_px``."""
    tokens = f"visual tokens sent: {panels.kept} of {panels.full} (stock LLaVA)"
    return (
        wrap_px(panels.caption, width_px, 1)
        + qa_lines(panels.question, panels.answer, width_px)
        + wrap_px(tokens, width_px, 1, lambda t: text_px(t, bold=True))
    )


def _draw_header(fig, panels: Panels, lines: list[str]) -> None:
    x, height = MARGIN / fig.bbox.width, fig.bbox.height
    for i, text in enumerate(lines):
        fig.text(
            x,
            1 - (8 + i * LINE_PX) / height,
            text,
            va="top",
            fontsize=FONT_PT,
            parse_math=False,
            fontweight="bold" if i == len(lines) - 1 else "normal",
        )
    handles, labels = _legend_entries(
        bool((panels.keep & ~panels.valid).any()), swatch_background(panels), panels.merged
    )
    fig.legend(
        handles=handles,
        labels=labels,
        loc="upper left",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(x, 1 - (4 + len(lines) * LINE_PX) / height),
        handlelength=1.5,
        columnspacing=1.2,
    )


def swatch_background(panels: Panels) -> tuple[float, float, float]:
    """RGB (0..1) under the legend's swatches: the full image's mean colour, so "dropped"
    shows what dimming does to this image, as the dropped patches in the panels do."""
    return tuple(float(v) for v in panels.crops[0].reshape(-1, 3).mean(axis=0) / 255)


def _legend_entries(stray: bool, background, merged: int = 0) -> tuple[list, list[str]]:
    """Legend swatches drawn as the panels draw tokens: each over ``background``, a kept
    one outlined (halo, then line), a dropped one under ``DIM_RGBA`` (a merged one, when
    ``merged`` contextual tokens were sent, under ``MERGED_RGBA``); padding opaque."""
    from matplotlib.patches import Patch

    def outlined(color, style="solid"):
        return (
            Patch(facecolor=background, edgecolor=HALO_COLOR, linewidth=HALO_WIDTH, linestyle=style),
            Patch(facecolor="none", edgecolor=color, linewidth=LINE_WIDTH, linestyle=style),
        )

    handles = [
        outlined(KEPT_COLOR),
        (Patch(facecolor=background, linewidth=0), Patch(facecolor=MERGED_RGBA if merged else DIM_RGBA, linewidth=0)),
        Patch(facecolor=PAD_RGBA, linewidth=0),
    ]
    labels = ["dominant" if merged else "kept", f"merged into {merged} contextual" if merged else "dropped", "padding"]
    if stray:  # reference mode selects padding tokens (unpadding drops them); VisionZip sends them
        handles.append(outlined(STRAY_COLOR, "dashed"))
        labels.append("in padding")
    return handles, labels


def figure(panels: Panels):
    """The matplotlib Figure of ``panels`` (Agg canvas, no pyplot state): a header as tall
    as its wrapped lines, then the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = figure_pixels(panels.grid)[0]
    lines = header_lines(panels, width - 2 * MARGIN)
    fig_px = figure_pixels(panels.grid, len(lines))
    fig = Figure(figsize=(fig_px[0] / DPI, fig_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    for p, pos in enumerate(partition_layout(panels.grid)):
        ax = fig.add_axes(panel_rect(pos, fig_px, header_px(len(lines))))
        title = panel_title(p, panels.grid, panels.keep[p], panels.valid[p], padding_sent=panels.merged > 0)
        _draw_panel(ax, panels.crops[p], panels.keep[p], panels.valid[p], title, merged=panels.merged > 0)
    _draw_header(fig, panels, lines)
    return fig


def draw(panels: Panels, path) -> pathlib.Path:
    """Save ``panels`` as a PNG of ``figure_pixels(panels.grid, header lines)`` pixels."""
    fig = figure(panels)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


# --------------------------------------------------------------------------- job output


# Columns a job writes that --from-output reads, and the `run` flag that puts each
# there when it is missing (the image and question are input columns the job copies
# only when asked to).
REQUIRED_OUTPUT = {"id": None, "n_visual_tokens_kept": None, "kept_indices": "--save-indices"}
SHOWN_IF_PRESENT = ("error", "selector", "mode", "budget", "answer")


def open_output(path: str, image_column: str, question_column: str, s3_endpoint: str | None = None):
    """The job output as a pyarrow dataset and the columns to read from it.

    s3:// is read through ``sources.output_filesystem``, the job's own S3 client
    (``s3_endpoint``, else AWS_ENDPOINT_URL_S3). Raises ConfigError (one line: the missing
    columns, what is there, the ``run`` flag that keeps them) before anything heavy runs,
    so a wrong output costs no model load.
    """
    import pyarrow.dataset as ds

    from hired_batch.job.sources import output_filesystem

    filesystem, where = output_filesystem(path, s3_endpoint)
    dataset = ds.dataset(where, format="parquet", filesystem=filesystem)
    names = dataset.schema.names
    need = {**REQUIRED_OUTPUT, image_column: f"--keep-column {image_column}"}
    missing = [c for c in need if c not in names]
    if missing:
        flags = [need[c] for c in missing if need[c]]
        hint = f"; rerun the job with {' '.join(flags)}" if flags else " (is it a hired-batch job output?)"
        if image_column in missing:
            hint += ", or point --image-column at the output column that holds the image"
        raise ConfigError(f"{path}: missing column(s) {missing} (found {sorted(names)}){hint}")
    optional = [c for c in (*SHOWN_IF_PRESENT, question_column) if c in names and c != image_column]
    return dataset, list(need) + list(dict.fromkeys(optional))


def drawable_rows(dataset, columns: list[str], batch_rows: int, skipped: list):
    """Yield output rows (dicts) that have kept indices, in file order; the ids of rows
    without them (error rows) go to ``skipped``, each with a printed reason."""
    for batch in dataset.to_batches(columns=columns, batch_size=max(batch_rows, 1)):
        for row in batch.to_pylist():
            if row["kept_indices"] is None or row.get("error"):
                print(f"skipped row id={row['id']!r}: {row.get('error') or 'no kept_indices'}")
                skipped.append(row["id"])
                continue
            yield row


def _file_name(i: int, row_id) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(row_id))[:80]
    return f"row{i:04d}_{safe}.png"


def _row_caption(row, source: str) -> str:
    """The selection the job ran with (from the row), then where the row came from."""
    where = f"{source}, row id={row['id']}"
    if not row.get("selector"):
        return where
    budget = row.get("budget")
    # the output's budget is a fraction, or the token count the job ran --budget-tokens with
    budget = "?" if budget is None else (f"{budget:g}" if budget <= 1 else f"{budget:g} tokens")
    return f"{selection_text(row['selector'], row.get('mode') or '?', budget)} | {where}"


def _draw_output_row(engine, row, args, i: int) -> pathlib.Path:
    from hired_batch.engine.inputs import decode_image

    image, error = decode_image(row[args.image_column])
    if error:
        raise ConfigError(f"row id={row['id']!r}, column {args.image_column!r}: {error}")
    caption = _row_caption(row, pathlib.Path(args.from_output).name)
    panels = panels_from_indices(engine, image, row["kept_indices"], row["n_visual_tokens_kept"], caption)
    panels = dataclasses.replace(panels, question=row.get(args.question_column), answer=row.get("answer"))
    return draw(panels, pathlib.Path(args.out) / _file_name(i, row["id"]))


# --------------------------------------------------------------------------- command


def _load_engine(args):
    from hired_batch.engine.hf import HiredEngine

    selection = SelectionConfig(
        selector=args.selector, mode=args.mode, budget=args.budget, alpha=args.alpha, save_indices=True
    )
    return HiredEngine.load(ModelConfig(path=args.model, device=args.device), selection)


def _run_image(args) -> int:
    from hired_batch.engine.inputs import decode_image

    image, error = decode_image(args.image)
    if error:
        raise ConfigError(f"{args.image}: {error}")
    panels = panels_for_image(_load_engine(args), image, args.question)
    path = draw(dataclasses.replace(panels, question=args.question), args.out)
    print(f"wrote {path} (sent {panels.kept} / {panels.full} visual tokens)")
    return 0


def _run_output(args) -> int:
    dataset, columns = open_output(
        args.from_output, args.image_column, args.question_column, args.s3_endpoint
    )  # before weights
    engine = _load_engine(args)
    skipped: list = []
    rows = itertools.islice(drawable_rows(dataset, columns, args.rows, skipped), args.rows)
    written = 0
    for i, row in enumerate(rows):
        print(f"wrote {_draw_output_row(engine, row, args, i)}")
        written += 1
    if not written:
        raise ConfigError(f"{args.from_output}: expected rows with kept_indices, found none")
    if written < args.rows:
        why = f", {len(skipped)} row(s) without kept_indices skipped" if skipped else ""
        print(
            f"drew {written} of the {args.rows} rows asked (--rows {args.rows}): "
            f"{args.from_output} has no more rows with kept_indices{why}"
        )
    return 0


def _run(args) -> int:
    if (args.image is None) == (args.from_output is None):
        raise ConfigError("give either IMAGE or --from-output PARQUET (exactly one)")
    if args.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {args.rows}")
    return _run_output(args) if args.from_output else _run_image(args)


def add_parser(sub) -> None:
    """Register ``hired-batch visualize``."""
    p = sub.add_parser(
        "visualize",
        help="draw the visual tokens HiRED keeps (PNG)",
        description="Draw kept / dropped / padding patches of every partition.",
    )
    p.add_argument("image", nargs="?", help="image file or URL (omit with --from-output)")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--out", required=True, help="PNG path; a directory with --from-output")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="prompt question (does not change the mask)")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of P*576 tokens kept, in (0, 1]")
    p.add_argument("--selector", choices=SELECTORS, default="hired")
    p.add_argument("--mode", choices=MODES, default="exact")
    p.add_argument("--alpha", type=float, default=0.5, help="share of the budget for the full image")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--from-output", metavar="PARQUET", help="job output to draw, written with --save-indices --keep-column IMAGE"
    )
    p.add_argument("--rows", type=int, default=4, help="rows of --from-output to draw")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="with an s3:// --from-output: S3-compatible endpoint (default AWS_ENDPOINT_URL_S3; "
        "credentials from AWS_* env)",
    )
    p.add_argument(
        "--image-column",
        default="image",
        help="output column holding the image (the job must run with --keep-column IMAGE)",
    )
    p.add_argument(
        "--question-column",
        default="question",
        help="output column holding the question, shown when present (--keep-column QUESTION)",
    )
    p.set_defaults(func=_run)
