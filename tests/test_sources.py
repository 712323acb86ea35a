"""Reading Parquet input (``job/sources.py``): a file that cannot be opened is refused
before Ray naming it; a row group that cannot be decoded is recorded and skipped, the
job's other rows are still read, and the job ends naming it (issue 19, item 3)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.bad_parquet import garble_row_group, truncate
from support.cli import run_before_ray

from hired_batch.config import S3Options
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.job.sources import ParquetRowsDatasource, clear_unreadable, unreadable_records

IMG = image_to_bytes(make_synthetic_image(64, 48, 0))


def write_rows(path, ids, row_group_size=None, **extra):
    """Rows with ids ``ids``, a question each and one image, in row groups of ``row_group_size``."""
    table = pa.table({"id": ids, "image": [IMG] * len(ids), "question": [f"what is {i}?" for i in ids], **extra})
    pq.write_table(table, path, row_group_size=row_group_size or len(ids), compression="none")
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_input_file_without_a_readable_footer_is_refused_naming_it(capsys, tmp_path, tiny_next, damage):
    (tmp_path / "in").mkdir()
    write_rows(tmp_path / "in/a.parquet", ["a", "b"])
    bad = write_rows(tmp_path / "in/b.parquet", ["c", "d"])
    if damage == "empty":
        bad.write_bytes(b"")
    else:
        truncate(bad)
    code, err = run_before_ray(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                               "--model", str(tiny_next))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"input file {bad} is not a readable Parquet file: ArrowInvalid: " in err
    assert "a.parquet" not in err


def read_all(source, path):
    return pa.concat_tables(list(source._read(str(path))))


def test_a_garbled_row_group_is_recorded_and_the_other_groups_are_read(tmp_path):
    """Generated ids count the skipped rows, so the rows after them keep their ids."""
    path = write_rows(tmp_path / "in.parquet", [f"r{i}" for i in range(6)], row_group_size=2)
    garble_row_group(path, 1, "question")
    out = str(tmp_path / "out")
    source = ParquetRowsDatasource([str(path)], ["image", "question"], None, S3Options(), report_to=out)
    table = read_all(source, path)
    assert table.column("id").to_pylist() == ["in.parquet#0", "in.parquet#1", "in.parquet#4", "in.parquet#5"]
    assert table.column("question").to_pylist() == ["what is r0?", "what is r1?", "what is r4?", "what is r5?"]
    (record,) = unreadable_records(out, S3Options())
    assert record["file"] == str(path) and record["row_group"] == 1 and record["rows"] == 2
    assert record["rows_read"] == 0 and "deserialize thrift" in record["error"]
    clear_unreadable(out, S3Options())  # a new run starts with no records
    assert unreadable_records(out, S3Options()) == []
    # with nowhere to record it, the error is the job's
    with pytest.raises(OSError, match="deserialize thrift"):
        read_all(ParquetRowsDatasource([str(path)], ["question"], "id", S3Options()), path)


def test_a_good_file_read_by_row_groups_keeps_every_row_once(tmp_path):
    path = write_rows(tmp_path / "in.parquet", [f"r{i}" for i in range(600)], row_group_size=300)
    source = ParquetRowsDatasource([str(path)], ["question"], "id", S3Options(), report_to=str(tmp_path / "out"))
    chunks = list(source._read(str(path)))
    assert max(c.num_rows for c in chunks) <= 256
    assert pa.concat_tables(chunks).column("id").to_pylist() == [f"r{i}" for i in range(600)]
    assert unreadable_records(str(tmp_path / "out"), S3Options()) == []
