"""A reproducible sample of a job's input, stratified by the image's anyres grid (what
``hired-batch calibrate`` runs every setting on).

Pruning costs different images differently: a 1x1-grid image sends 2 crops, a 2x2 one
5, and how much a budget loses depends on it. So the sample holds every grid the input
has, each roughly in its share (``stratified_counts``). Steps (``draw_sample``):

1. a candidate pool drawn by ``seed`` (the whole input when it is small);
2. each candidate's image decoded (a row whose image or question the job would refuse
   is not usable) and its grid computed from the checkpoint's geometry;
3. ``stratified_counts`` rows per grid, drawn by ``seed`` inside each grid;
4. the rows written, every input column kept, to one Parquet file; ids are the ids the
   full job gives these rows (the id column, else the generated ``FILE#ROW``), so
   answers on the sample and on the full run can be matched.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Hashable, Mapping

from hired_batch.config import ConfigError, JobConfig

MIN_SAMPLE = 30  # fewer usable rows than this say nothing at 95 %: refused
POOL_FACTOR = 10  # candidates decoded per sampled row (a rare grid is then seldom missed)
WHOLE_INPUT_ROWS = 5000  # an input this small is the pool itself: every grid it has is found


def stratified_counts(sizes: Mapping[Hashable, int], n: int) -> dict:
    """Rows to draw from each stratum (``sizes``: rows it has) for ``n`` in all: every
    stratum at least one, the rest one at a time to the stratum furthest below its
    proportional share ``n * size / total`` (ties: the order of ``sizes``), never more
    than it has. All rows when ``n`` >= the total. ValueError when ``n`` is below the
    number of strata (one of them would be left out)."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    if n < len(sizes):
        raise ValueError(f"a sample of {n} cannot hold one row of each of {len(sizes)} strata")
    counts = {k: 1 for k in sizes}
    for _ in range(n - len(sizes)):
        open_ = [k for k in sizes if counts[k] < sizes[k]]
        k = max(open_, key=lambda k: (n * sizes[k] / total - counts[k], -list(sizes).index(k)))
        counts[k] += 1
    return counts


@dataclass(frozen=True)
class Sample:
    """A drawn sample, written to ``path``."""

    path: str  # the Parquet file of the sampled rows (every input column, and the id column)
    ids: tuple  # the sampled rows' ids, in input order
    grid_of: dict  # id -> anyres grid as "RxC" ("1x1" for LLaVA-1.5's single crop)
    size_of: dict  # id -> image (height, width)
    pool_grids: dict  # grid -> usable candidate rows in the pool
    pool: int  # candidate rows looked at
    usable: int  # of them, usable
    input_rows: int  # rows of the whole input

    @property
    def grids(self) -> dict:
        """grid -> rows in the sample."""
        out: dict = {}
        for i in self.ids:
            out[self.grid_of[i]] = out.get(self.grid_of[i], 0) + 1
        return dict(sorted(out.items()))


def grid_name(grid) -> str:
    """An anyres grid as the report writes it: "2x1" (rows x cols); "1x1" for one crop."""
    return "1x1" if grid is None else f"{grid[0]}x{grid[1]}"


def draw_sample(job: JobConfig, n: int, seed: int, directory: str) -> Sample:
    """Draw ``n`` usable rows of ``job``'s input (Parquet or a folder of images, local or
    S3) by ``seed``, stratified by anyres grid, and write them to ``directory/sample.parquet``.
    ConfigError when the input has fewer than ``MIN_SAMPLE`` usable rows, or fewer than ``n``
    is not an error: the sample is then every usable row."""
    import pyarrow.parquet as pq

    from hired_batch.job.image_folder import image_folder
    from hired_batch.job.sources import is_hf_job, list_parquet_files

    if is_hf_job(job):
        raise ConfigError(
            "calibrate reads Parquet inputs (local or s3://); export the Hugging Face dataset "
            "to Parquet first (datasets' Dataset.to_parquet) and pass that"
        )
    folder = image_folder(job)
    if folder:  # a folder of images: a row per image file, its id the relative path
        n_rows, read = len(folder[1]), lambda picked: _folder_rows(folder, picked, job)
    else:
        files = list_parquet_files(list(job.inputs), job.s3)
        rows = _row_index(files, job)
        n_rows, read = len(rows), lambda picked: _read_rows(files, [rows[i] for i in picked], job)
    rng = random.Random(seed)
    want = n_rows if n_rows <= WHOLE_INPUT_ROWS else max(POOL_FACTOR * n, WHOLE_INPUT_ROWS)
    pool = sorted(rng.sample(range(n_rows), min(want, n_rows)))
    table = read(pool)
    grids, sizes = _grids(table, job)
    usable = [i for i, g in enumerate(grids) if g is not None]
    if len(usable) < MIN_SAMPLE:
        raise ConfigError(
            f"calibrate needs at least {MIN_SAMPLE} usable rows (an image and a question the job "
            f"accepts); found {len(usable)} in the {len(pool)} rows looked at of {n_rows}"
        )
    strata: dict = {}
    for i in usable:
        strata.setdefault(grids[i], []).append(i)
    strata = dict(sorted(strata.items()))
    counts = stratified_counts({g: len(v) for g, v in strata.items()}, min(n, len(usable)))
    chosen = sorted(i for g, members in strata.items() for i in rng.sample(members, counts[g]))
    picked = table.take(chosen)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "sample.parquet")
    pq.write_table(picked, path)
    ids = picked.column(job.columns.id_column).to_pylist()
    return Sample(
        path=path,
        ids=tuple(ids),
        grid_of={id_: grids[i] for id_, i in zip(ids, chosen)},
        size_of={id_: sizes[i] for id_, i in zip(ids, chosen)},
        pool_grids={g: len(v) for g, v in strata.items()},
        pool=len(pool),
        usable=len(usable),
        input_rows=n_rows,
    )


def _row_index(files: list[str], job: JobConfig) -> list[tuple[int, int, int, int]]:
    """(file, row group, row in group, row in file) of every input row, from the footers."""
    import pyarrow.parquet as pq

    from hired_batch.job.sources import pyarrow_fs

    out = []
    for f, path in enumerate(files):
        fs, p = pyarrow_fs(path, job.s3)
        meta = pq.ParquetFile(p, filesystem=fs).metadata
        row = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            out += [(f, g, r, row + r) for r in range(rows)]
            row += rows
    return out


def _folder_rows(folder: tuple, picked: list[int], job: JobConfig):
    """The ``picked`` images of a folder (``image_folder``'s (folder, files)) as the job's
    rows: the image column holds each file's path or URL, the id its relative path."""
    import pyarrow as pa

    from hired_batch.job.image_folder import relative_ids

    root, images = folder
    paths = [images[i] for i in picked]
    return pa.table({job.columns.image_column: paths, job.columns.id_column: relative_ids(root, paths)})


def _read_rows(files: list[str], wanted: list[tuple], job: JobConfig):
    """The ``wanted`` rows (every column) as one table, with the ids the job gives them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.job.sources import _short_name, id_root, pyarrow_fs

    root = id_root(list(job.inputs), files)
    id_col = job.columns.id_column
    parts = []
    by_group: dict = {}
    for f, g, r, in_file in wanted:
        by_group.setdefault((f, g), []).append((r, in_file))
    for (f, g), members in sorted(by_group.items()):
        fs, p = pyarrow_fs(files[f], job.s3)
        part = pq.ParquetFile(p, filesystem=fs).read_row_group(g).take([r for r, _ in members])
        if id_col not in part.column_names:  # the generated ids (sources: FILE#ROW)
            name = _short_name(files[f], root)
            part = part.append_column(id_col, pa.array([f"{name}#{i}" for _, i in members], pa.string()))
        parts.append(part)
    return pa.concat_tables(parts, promote_options="default")


def _grids(table, job: JobConfig) -> tuple[list, list]:
    """Each row's grid name (None: the job would refuse the row) and image (h, w)."""
    from transformers import AutoConfig

    from hired_batch.engine import token_plan
    from hired_batch.engine.inputs import decode_images, validate_question
    from hired_batch.job.sources import fsspec_options

    c = job.columns
    geo = token_plan.Geometry.from_config(AutoConfig.from_pretrained(job.model.path, trust_remote_code=False))
    images = decode_images(
        table.column(c.image_column).to_pylist(), limits=job.limits, storage_options=fsspec_options(job.s3)
    )
    questions = table.column(c.question_column).to_pylist() if c.question_column else [None] * table.num_rows
    grids, sizes = [], []
    for (img, err, _, exc), q in zip(images, questions):
        bad = err or exc or (c.question_column and validate_question(q, limits=job.limits)[1])
        hw = None if img is None else (img.height, img.width)
        grids.append(None if bad else grid_name(token_plan.grid_of(hw, geo)))
        sizes.append(hw)
    return grids, sizes
