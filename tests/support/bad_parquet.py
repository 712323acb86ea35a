"""Parquet files that break in the ways real ones do: a bad footer, garbled pages."""

from __future__ import annotations

import pyarrow.parquet as pq


def truncate(path) -> None:
    """Cut the file in half: the footer (and its magic bytes) is gone."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def garble_row_group(path, group: int, column: str) -> None:
    """Overwrite the header of ``column``'s first data page in row group ``group``: the
    footer stays good (the file passes a footer read), decoding that group fails."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == column)
    data = bytearray(open(path, "rb").read())
    data[chunk.data_page_offset : chunk.data_page_offset + 8] = b"\xff" * 8
    open(path, "wb").write(bytes(data))
