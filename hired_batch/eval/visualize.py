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

The figure has a fixed pixel size per layout (``figure_pixels``): one panel is drawn at
1:1 over the 336-px crop. This module does not generate answers, write Parquet or
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

from hired_batch.config import ConfigError

# Figure geometry, in output pixels (DPI pixels per inch). A panel is CROP px square.
DPI = 100
CROP = 336  # px per panel: the CLIP crop drawn 1:1
MARGIN = 12  # px left and right of each panel, and below it
TITLE_PX = 30  # px above each panel for its title
HEADER_PX = 84  # px at the top: three summary lines and the legend
LINE_PX = 18  # px between header lines

KEPT_COLOR = "#39ff14"  # outline of a kept patch (over a black halo: visible on any image)
STRAY_COLOR = "#ff3030"  # outline of a kept patch in padding (reference mode drops it later)
HALO_COLOR = "black"
DIM_RGBA = (0.0, 0.0, 0.0, 0.62)  # over a dropped content patch
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


def figure_pixels(grid) -> tuple[int, int]:
    """(width, height) of the saved PNG in pixels for a layout."""
    n_rows, n_cols = figure_shape(grid)
    return n_cols * (CROP + 2 * MARGIN), HEADER_PX + n_rows * (TITLE_PX + CROP + MARGIN)


def panel_rect(pos: tuple[int, int], fig_px: tuple[int, int]) -> list[float]:
    """matplotlib axes rectangle [left, bottom, width, height] (figure fractions)."""
    r, c = pos
    width, height = fig_px
    left = c * (CROP + 2 * MARGIN) + MARGIN
    top = HEADER_PX + r * (TITLE_PX + CROP + MARGIN) + TITLE_PX
    return [left / width, 1 - (top + CROP) / height, CROP / width, CROP / height]


def patch_boxes(mask_row, side: int = 24, patch: int = 14) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) in crop pixels of every True token of a raster (side*side,) mask."""
    mask = np.asarray(mask_row, dtype=bool).reshape(-1)
    if mask.size != side * side:
        raise ValueError(f"mask row must hold side*side = {side * side} tokens, got {mask.size}")
    return [(int(j % side) * patch, int(j // side) * patch, patch, patch) for j in np.flatnonzero(mask)]


def token_shading(keep_row, valid_row, side: int = 24) -> np.ndarray:
    """RGBA (side, side, 4) overlay: dropped content dimmed, padding shaded, kept clear."""
    keep = np.asarray(keep_row, dtype=bool).reshape(side, side)
    valid = np.asarray(valid_row, dtype=bool).reshape(side, side)
    shade = np.zeros((side, side, 4))
    shade[valid & ~keep] = DIM_RGBA
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

    -1 entries (image-newline tokens in a stock LLaVA-NeXT ``kept_indices``) hold no
    patch and are skipped.
    """
    flat = np.asarray(list(indices), dtype=np.int64)
    flat = flat[flat != -1]
    if flat.size and (flat.min() < 0 or flat.max() >= n_parts * n_tokens):
        raise ConfigError(
            f"kept_indices must lie in [0, {n_parts * n_tokens}) for this image "
            f"({n_parts} partitions x {n_tokens} tokens), found {int(flat.min())}..{int(flat.max())}; "
            "was the output written with another model?")
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


def _geometry(engine, prepared):
    """(crops, valid, grid) of one prepared item: the engine's own geometry."""
    ip = engine.pre.processor.image_processor
    crops = np.stack([denormalize(p, ip.image_mean, ip.image_std) for p in prepared.pixel_values])
    grid = engine.grid_of(prepared.image_size)
    valid = engine.valid_of(prepared.image_size, grid).numpy()
    if len(crops) != len(partition_layout(grid)):
        raise ConfigError(f"expected {len(partition_layout(grid))} partitions for grid {grid}, "
                         f"the processor gave {len(crops)}")
    return crops, valid, grid


def panels_for_image(engine, image, question: str = DEFAULT_QUESTION) -> Panels:
    """Run the vision tower and the engine's selector on one PIL image."""
    prepared = engine.pre(image, question)
    crops, valid, grid = _geometry(engine, prepared)
    vis = engine.encode([prepared])
    # Draw what reaches the language model, not the selection before packing: in
    # reference mode the published packing drops selected tokens (its transposed canvas).
    sent = engine.packed_indices(vis.masks[0], tuple(prepared.image_size), grid, newline=False)
    keep = mask_from_indices(sent.tolist(), len(crops), valid.shape[1])
    return Panels(crops, keep, valid, grid, vis.counts[0], vis.full_counts[0], _caption(engine.selection))


def panels_from_indices(engine, image, indices, kept: int, caption: str) -> Panels:
    """A saved ``kept_indices`` row drawn over its image."""
    prepared = engine.pre(image, DEFAULT_QUESTION)  # the question does not change the pixels
    crops, valid, grid = _geometry(engine, prepared)
    keep = mask_from_indices(indices, len(crops), valid.shape[1])
    return Panels(crops, keep, valid, grid, kept, engine.full_count(prepared.image_size), caption)


def _caption(sel) -> str:
    budget = f"{sel.budget_tokens} tokens" if sel.budget_tokens is not None else f"{sel.budget:g}"
    return selection_text(sel.selector, sel.mode, budget, f"{sel.alpha:g}")


def selection_text(selector: str, mode: str, budget: str, alpha: str | None = None) -> str:
    """"selector S, mode M, budget B[, alpha A]", or stock LLaVA for ``full``."""
    if selector == "full":
        return "selector full (stock LLaVA)"
    return f"selector {selector}, mode {mode}, budget {budget}" + (f", alpha {alpha}" if alpha else "")


# --------------------------------------------------------------------------- drawing


def panel_title(p: int, grid, keep_row, valid_row) -> str:
    """"name: kept / content tokens" of one partition; kept padding tokens noted apart."""
    kept = int((keep_row & valid_row).sum())
    if p == 0:
        name = "image" if grid is None else "full image"  # LLaVA-1.5: one centre crop
    else:
        name = f"sub-image r{(p - 1) // grid[1]} c{(p - 1) % grid[1]}"
    title = f"{name}: {kept} kept / {int(valid_row.sum())}"
    stray = int((keep_row & ~valid_row).sum())
    return title + (f" (+{stray} in padding, dropped)" if stray else "")


def _draw_boxes(ax, boxes, color: str, style: str = "solid") -> None:
    """Outlines inset by 1 px (neighbours stay apart), a dark halo under a bright line."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    for edge, width in ((HALO_COLOR, 1.6), (color, 0.8)):
        rects = [Rectangle((x + 1, y + 1), w - 2, h - 2) for x, y, w, h in boxes]
        ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=edge,
                                          linewidth=width, linestyle=style))


def _draw_panel(ax, crop, keep_row, valid_row, title: str) -> None:
    side = math.isqrt(keep_row.size)
    size = crop.shape[0]  # crop px; patch boxes are in these units
    ax.imshow(crop, extent=(0, size, size, 0), interpolation="nearest")
    ax.imshow(token_shading(keep_row, valid_row, side), extent=(0, size, size, 0), interpolation="nearest")
    _draw_boxes(ax, patch_boxes(keep_row & valid_row, side, size // side), KEPT_COLOR)
    _draw_boxes(ax, patch_boxes(keep_row & ~valid_row, side, size // side), STRAY_COLOR, "dashed")
    ax.set_title(title, fontsize=8.5, pad=4)
    ax.set_axis_off()


def _chars(width_px: int) -> int:
    """Characters that fit in ``width_px`` at 9 pt (~5.5 px a character)."""
    return width_px * 2 // 11


def _cut(text: str, n: int) -> str:
    text = " ".join(str(text).split())  # one line: newlines in a question would overprint
    return text if len(text) <= n else text[: max(n - 1, 0)] + "\u2026"


def qa_line(question: str | None, answer: str | None, width_px: int) -> str:
    """"Q: ...   A: ..." cut to ``width_px``; the question gets at least half the line."""
    n, sep = _chars(width_px), "   A: "
    a = None if answer is None else " ".join(str(answer).split())
    q = "Q: " + ("(not in the output)" if question is None else question)
    q = _cut(q, n if a is None else max(n - len(sep) - len(a), n // 2))
    return q if a is None else q + sep + _cut(a, n - len(q) - len(sep))


def header_lines(panels: Panels, width_px: int) -> list[str]:
    """The header's text lines: selection and source, question/answer, tokens sent."""
    return [_cut(panels.caption, _chars(width_px)), qa_line(panels.question, panels.answer, width_px),
            f"visual tokens sent: {panels.kept} of {panels.full} (stock LLaVA)"]


def _draw_header(fig, panels: Panels) -> None:
    x, height = MARGIN / fig.bbox.width, fig.bbox.height
    lines = header_lines(panels, int(fig.bbox.width) - 2 * MARGIN)
    for i, text in enumerate(lines):
        fig.text(x, 1 - (8 + i * LINE_PX) / height, text, va="top", fontsize=9,
                 fontweight="bold" if i == len(lines) - 1 else "normal")
    handles = _legend_handles(bool((panels.keep & ~panels.valid).any()))
    fig.legend(handles=handles, loc="upper left", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(x, 1 - (4 + len(lines) * LINE_PX) / height), handlelength=1.5, columnspacing=1.2)


def _legend_handles(stray: bool) -> list:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="none", edgecolor=KEPT_COLOR, linewidth=1.2, label="kept"),
               Patch(facecolor=DIM_RGBA, label="dropped"), Patch(facecolor=PAD_RGBA, label="padding")]
    if stray:  # only reference mode selects padding tokens; unpadding drops them
        handles.append(Patch(facecolor="none", edgecolor=STRAY_COLOR, linestyle="--", label="in padding"))
    return handles


def draw(panels: Panels, path) -> pathlib.Path:
    """Save ``panels`` as a PNG of ``figure_pixels(panels.grid)`` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig_px = figure_pixels(panels.grid)
    fig = Figure(figsize=(fig_px[0] / DPI, fig_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    for p, pos in enumerate(partition_layout(panels.grid)):
        ax = fig.add_axes(panel_rect(pos, fig_px))
        title = panel_title(p, panels.grid, panels.keep[p], panels.valid[p])
        _draw_panel(ax, panels.crops[p], panels.keep[p], panels.valid[p], title)
    _draw_header(fig, panels)
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
    from hired_batch.config import ModelConfig, SelectionConfig
    from hired_batch.engine.hf import HiredEngine

    selection = SelectionConfig(selector=args.selector, mode=args.mode, budget=args.budget,
                                alpha=args.alpha, return_indices=True)
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
    dataset, columns = open_output(args.from_output, args.image_column, args.question_column,
                                   args.s3_endpoint)  # before weights
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
        print(f"drew {written} of the {args.rows} rows asked (--rows {args.rows}): "
              f"{args.from_output} has no more rows with kept_indices{why}")
    return 0


def _run(args) -> int:
    if (args.image is None) == (args.from_output is None):
        raise ConfigError("give either IMAGE or --from-output PARQUET (exactly one)")
    if args.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {args.rows}")
    return _run_output(args) if args.from_output else _run_image(args)


def add_parser(sub) -> None:
    """Register ``hired-batch visualize``."""
    from hired_batch.config import MODES, SELECTORS

    p = sub.add_parser("visualize", help="draw the visual tokens HiRED keeps (PNG)",
                       description="Draw kept / dropped / padding patches of every partition.")
    p.add_argument("image", nargs="?", help="image file or URL (omit with --from-output)")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--out", required=True, help="PNG path; a directory with --from-output")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="prompt question (does not change the mask)")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of P*576 tokens kept, in (0, 1]")
    p.add_argument("--selector", choices=SELECTORS, default="hired")
    p.add_argument("--mode", choices=MODES, default="exact")
    p.add_argument("--alpha", type=float, default=0.5, help="share of the budget for the full image")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--from-output", metavar="PARQUET",
                   help="job output to draw, written with --save-indices --keep-column IMAGE")
    p.add_argument("--rows", type=int, default=4, help="rows of --from-output to draw")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="with an s3:// --from-output: S3-compatible endpoint (default AWS_ENDPOINT_URL_S3; "
                        "credentials from AWS_* env)")
    p.add_argument("--image-column", default="image",
                   help="output column holding the image (the job must run with --keep-column IMAGE)")
    p.add_argument("--question-column", default="question",
                   help="output column holding the question, shown when present (--keep-column QUESTION)")
    p.set_defaults(func=_run)
