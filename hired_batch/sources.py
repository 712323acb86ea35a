"""Where rows come from and where answers go: Parquet (local, s3://), HF datasets.

Resolves ``--input`` into a Ray Dataset whose rows carry a stable ``id``, and builds
the filesystem objects for ``s3://`` with an optional endpoint. Credentials come only
from the standard AWS chain; nothing here logs a URL with secrets.

This module does not decode images or run models.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

ID_FROM_ROW = "__hb_row_id"  # internal: generated when the input has no id column


@dataclass(frozen=True)
class S3Options:
    """How to reach S3-compatible storage (credentials: the standard AWS chain)."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:9000; None = AWS / AWS_ENDPOINT_URL_S3


def s3_endpoint(opts: S3Options) -> str | None:
    return opts.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def fsspec_options(opts: S3Options) -> dict:
    """storage_options for fsspec/s3fs."""
    ep = s3_endpoint(opts)
    return {"client_kwargs": {"endpoint_url": ep}} if ep else {}


def pyarrow_fs(path: str, opts: S3Options):
    """(pyarrow filesystem, path without scheme) for a local or s3:// path.

    S3 goes through s3fs (wrapped for pyarrow): the same client reads images, inputs
    and writes outputs, and S3-compatible stores that reject the native client's
    multipart checksums still work.
    """
    import pyarrow.fs as pafs

    if path.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**fsspec_options(opts))
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(path)


def list_parquet_files(inputs: list[str], opts: S3Options) -> list[str]:
    """Expand files, directories and globs into a sorted list of Parquet files."""
    import fsspec

    found: list[str] = []
    for spec in inputs:
        fs, _, paths = fsspec.get_fs_token_paths(spec, storage_options=fsspec_options(opts))
        for p in paths:
            if fs.isdir(p):
                found += [f for f in fs.find(p) if f.endswith(".parquet")]
            elif fs.exists(p):
                found.append(p)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found = [f if proto in ("file", "local") or "://" in f else f"{proto}://{f}" for f in found]
    if not found:
        raise ValueError(f"no Parquet files found at {inputs}; expected files, directories or globs")
    return sorted(set(found))


def parquet_schema_names(path: str, opts: S3Options) -> list[str]:
    """Column names of one Parquet file (for fail-fast column checks)."""
    import pyarrow.parquet as pq

    fs, p = pyarrow_fs(path, opts)
    return list(pq.read_schema(p, filesystem=fs).names)


def read_parquet_rows(files: list[str], columns: list[str], id_column: str | None, opts: S3Options):
    """Ray Dataset of the wanted columns; adds a stable ``file#row`` id if none exists.

    One read task per file keeps row numbers stable across runs (resume relies on it).
    """
    import ray

    root = posixpath.commonpath([f.split("://")[-1] for f in files]) if len(files) > 1 else ""
    items = [{"path": f, "name": _short_name(f, root)} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(
        _read_file_batches, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(columns=columns, id_column=id_column, opts=opts),
    )


def _short_name(path: str, root: str) -> str:
    bare = path.split("://")[-1]
    rel = posixpath.relpath(bare, root) if root else posixpath.basename(bare)
    return rel


def _read_file_batches(batch, columns, id_column, opts):
    """Yield one file's rows in chunks, with a generated id if asked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, name = batch["path"][0].as_py(), batch["name"][0].as_py()
    fs, p = pyarrow_fs(path, opts)
    row = 0
    for chunk in pq.ParquetFile(p, filesystem=fs).iter_batches(batch_size=256, columns=columns):
        table = pa.Table.from_batches([chunk])
        if id_column is None:
            ids = [f"{name}#{row + i}" for i in range(table.num_rows)]
            table = table.append_column(ID_FROM_ROW, pa.array(ids, pa.string()))
        row += table.num_rows
        yield table


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> (name, config, split); split defaults to train."""
    parts = spec[len("hf:"):].split(":")
    if not parts[0]:
        raise ValueError(f"expected hf:NAME[:CONFIG][:SPLIT], got {spec!r}")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1] or None, parts[2]


def load_hf_table(spec: str):
    """A Hugging Face dataset (hub spec or ``save_to_disk`` directory) as a pyarrow Table.

    Images stay in the stored ``{bytes, path}`` struct; nothing is decoded here.
    """
    import datasets

    if spec.startswith("hf:"):
        name, config, split = parse_hf_spec(spec)
        ds = datasets.load_dataset(name, config, split=split)
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else sorted(ds)[0]
            ds = ds[split]
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds.with_format("arrow")[:]


def is_hf_input(spec: str) -> bool:
    """True for hf:NAME specs and local ``save_to_disk`` directories."""
    if spec.startswith("hf:"):
        return True
    return os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json")) or (
        os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_dict.json")))
