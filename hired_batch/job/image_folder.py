"""A folder of image files as the job's input (issue 21 item 3): ``--input DIR`` (local or
``s3://``) holding images and no Parquet gives one row per image, its id the path
relative to the folder and its image the file's full path, which the preprocessing
stage opens (so a bad file becomes an error row, as any bad image does).

Which kind an input is gets decided here, once, from one listing of the folder: a
folder holding both Parquet and image files, or neither, is refused before Ray starts.
"""

from __future__ import annotations

import posixpath

from hired_batch.config import ColumnSpec, ConfigError, JobConfig, S3Options
from hired_batch.engine.inputs import redact_url
from hired_batch.job.sources import ROW_ID, fsspec_options

# What counts as an image file in a folder (compared lower-cased: .JPG is an image too)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tiff", ".tif")
IMAGES_PER_READ_TASK = 1000  # paths per Ray read task: a block of strings, cheap; many tasks spread the read


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _listing(spec: str, opts: S3Options):
    """(fsspec filesystem, the folder without scheme, every file under it) or None when
    ``spec`` is not a folder (a file, a glob, an ``hf:`` dataset)."""
    import fsspec

    if spec.startswith("hf:"):
        return None
    try:
        fs, _, paths = fsspec.get_fs_token_paths(spec, storage_options=fsspec_options(opts))
    except Exception:  # noqa: BLE001 - not ours to judge: list_parquet_files says what is wrong with it
        return None
    if len(paths) != 1 or not fs.isdir(paths[0]):
        return None
    root = paths[0].rstrip("/")
    return fs, root, sorted(fs.find(root))


def image_folder(job: JobConfig) -> tuple[str, list[str]] | None:
    """(the folder, its image files as full paths/URLs, sorted) when ``--input`` is a folder
    of images; None for Parquet (or HF) input. ConfigError, one line, for a folder holding
    both Parquet and image files, or neither, and for a folder of images given beside
    other inputs."""
    for spec in job.inputs:
        listed = _listing(spec, job.s3)
        if listed is None:
            continue
        fs, root, files = listed
        parquet = [f for f in files if f.endswith(".parquet")]
        images = [f for f in files if is_image_file(f)]
        where = redact_url(spec)
        if parquet and images:
            raise ConfigError(
                f"input {where} holds both Parquet files ({len(parquet)}, e.g. {parquet[0]}) and image files "
                f"({len(images)}, e.g. {images[0]}); expected one kind: Parquet shards, or a folder of images"
            )
        if not parquet and not images:
            raise ConfigError(
                f"input {where} holds no Parquet files and no image files ({len(files)} other file(s)); "
                f"expected Parquet shards, or images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})"
            )
        if images:
            if len(job.inputs) > 1:
                raise ConfigError(
                    f"input {where} is a folder of images: give it as the only --input "
                    f"(got {len(job.inputs)} --input values)"
                )
            scheme = "" if "://" not in spec else spec.split("://", 1)[0] + "://"
            return spec, [scheme + f if scheme and "://" not in f else f for f in images]
    return None


def check_image_folder_columns(folder: str, c: ColumnSpec, needed: list[str]) -> None:
    """A folder's rows hold only the image (and its path as id): refuse options that read
    other columns (``needed``: every column the job reads), naming the folder and what
    to give instead."""
    if c.question_column is not None:
        raise ConfigError(
            f"input {redact_url(folder)} is a folder of images, which has no question column "
            f"{c.question_column!r}: give --question-column none and the question as --prompt "
            "(e.g. --prompt 'Describe the image.')"
        )
    if c.id_column_given:
        raise ConfigError(
            f"--id-column {c.id_column} does not apply to a folder of images: each image's id is its "
            "path relative to the folder; drop --id-column"
        )
    missing = [n for n in needed if n != c.image_column]
    if missing:
        raise ConfigError(
            f"column(s) {missing} not found in {redact_url(folder)}: a folder of images gives each row only "
            f"its image ({c.image_column!r}) and its path as id; drop the options that read them (--keep-column, "
            "a --task's columns)"
        )


def read_image_folder(folder: str, images: list[str], c: ColumnSpec, num_cpus: float):
    """Ray Dataset of ``c.image_column`` (each file's full path or URL) and ``id`` (its path
    relative to ``folder``), through a Ray ``Read``, so Ray Data's checkpoint filter
    skips images already written on resume."""
    import ray

    return ray.data.read_datasource(ImageFolderDatasource(folder, images, c.image_column), num_cpus=num_cpus)


def relative_ids(folder: str, images: list[str]) -> list[str]:
    """Each image's path relative to ``folder`` (posix, no scheme): its row id."""
    root = folder.split("://")[-1].rstrip("/")
    if "://" not in folder:
        import os

        root = os.path.abspath(root)
    return [posixpath.relpath(f.split("://")[-1], root) for f in images]


def _ray_datasource_base():
    from ray.data.datasource import Datasource

    return Datasource


class ImageFolderDatasource(_ray_datasource_base()):
    """Read tasks of ``IMAGES_PER_READ_TASK`` paths each; rows: image path/URL and id."""

    def __init__(self, folder: str, images: list[str], image_column: str):
        self.images, self.ids, self.image_column = list(images), relative_ids(folder, images), image_column

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = []
        for start in range(0, len(self.images), IMAGES_PER_READ_TASK):
            chunk = slice(start, start + IMAGES_PER_READ_TASK)
            images, ids = self.images[chunk], self.ids[chunk]
            meta = BlockMetadata(num_rows=len(ids), size_bytes=None, exec_stats=None, input_files=None)
            # the task holds only its own paths (not ``self``: every task would carry every path)
            tasks.append(
                ReadTask(lambda col=self.image_column, images=images, ids=ids: [_block(col, images, ids)], meta)
            )
        return tasks


def _block(image_column: str, images: list[str], ids: list[str]):
    import pyarrow as pa

    return pa.table({image_column: pa.array(images, pa.string()), ROW_ID: pa.array(ids, pa.string())})
