"""Reading Parquet input (``job/sources.py``): a file that cannot be opened is refused
before Ray naming it; a row group that cannot be decoded is recorded and skipped, the
job's other rows are still read, and the job ends naming it (issue 19, item 3). The
storage options the job builds reach only the filesystems they are for."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.bad_parquet import garble_row_group, truncate
from support.cli import run_before_ray

from hired_batch.config import S3Options
from hired_batch.engine.inputs import decode_image, image_to_bytes, make_synthetic_image
from hired_batch.job.sources import (
    ParquetRowsDatasource,
    clear_unreadable,
    fsspec_options,
    id_root,
    list_parquet_files,
    unreadable_records,
)

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
    code, err = run_before_ray(
        capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_next)
    )
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


@pytest.fixture()
def own_ray():
    """The run below starts an embedded Ray in this process; other tests need none."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_garbled_row_group_ends_the_job_naming_it_and_the_resume_after_the_fix_is_exact(
    own_ray, capsys, tmp_path, tiny_next
):
    """One job: a good file with one broken image (an error row) and a file whose row
    group 1 of 3 cannot be decoded. Every other row is written once; the job exits 1 with
    a line naming the file and row group and the resume command, and a line for
    --max-failed-fraction (1 failed of 8 > 0.1). The file removed, the resume writes
    nothing; back and fixed, the resume adds only the two missing rows (1 failed of 10
    is not > 0.1: exit 0)."""
    import shlex

    from support.outputs import check_every_row_once

    from hired_batch.cli import main

    (tmp_path / "in").mkdir()
    good = [f"g{i}" for i in range(4)]
    # a kept integer column with nulls (item 10): the output keeps its type and values
    n = {i: None if k % 3 == 1 else 2**60 + k for k, i in enumerate(good + [f"b{i}" for i in range(6)])}
    write_rows(tmp_path / "in/good.parquet", good, n=pa.array([n[i] for i in good], pa.int64()))
    table = pq.read_table(tmp_path / "in/good.parquet")
    pq.write_table(
        table.set_column(1, "image", pa.array([b"not an image", IMG, IMG, IMG])), tmp_path / "in/good.parquet"
    )
    bad_ids = [f"b{i}" for i in range(6)]
    bad_n = pa.array([n[i] for i in bad_ids], pa.int64())
    bad = write_rows(tmp_path / "in/bad.parquet", bad_ids, row_group_size=2, n=bad_n)
    garble_row_group(bad, 1, "question")
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = [
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--model",
        str(tiny_next),
        "--checkpoint",
        str(ckpt),
        "--max-failed-fraction",
        "0.1",
        "--keep-column",
        "n",
        "--max-new-tokens",
        "2",
        "--batch-size",
        "4",
        "--num-cpus",
        "2",
        "--num-gpus",
        "1",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, captured.err[-3000:]
    assert errors[0] == (
        "error: 1 of 8 rows failed, more than --max-failed-fraction 0.1; most common error "
        f"(1 row(s)): {pq.read_table(out).filter(pa.compute.field('id') == 'g0')['error'][0]}"
    )
    assert errors[1].startswith(f"error: 2 input row(s) could not be read: {bad} row group(s) 1 (OSError: ")
    assert errors[1].isprintable() and "fix or remove the file; resume with: " in errors[1], errors[1]
    resume = shlex.split(errors[1].split("resume with: ", 1)[1])
    resume = resume[resume.index("run") :]  # after how this process was started (pytest's python -m)
    assert resume == argv
    assert "rows: 8 (ok 7, failed 1, lost 2 in unreadable input)" in captured.out
    check_every_row_once(pq.read_table(out), good + ["b0", "b1", "b4", "b5"])

    bad.rename(tmp_path / "set-aside.parquet")  # the file removed: the resume writes nothing
    assert main(resume) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("error: ")] == errors[:1]
    assert "this run: 0 rows" in captured.out
    check_every_row_once(pq.read_table(out), good + ["b0", "b1", "b4", "b5"])

    write_rows(bad, bad_ids, row_group_size=2, n=bad_n)  # the file back, fixed
    assert main(resume) == 0, capsys.readouterr().err[-3000:]
    written = pq.read_table(out)
    check_every_row_once(written, good + bad_ids)
    assert "this run: 2 rows" in capsys.readouterr().out
    assert written.schema.field("n").type == pa.int64()
    assert {r["id"]: r["n"] for r in written.select(["id", "n"]).to_pylist()} == n


@pytest.mark.slow
def test_unreadable_records_on_s3(monkeypatch, tmp_path):
    """The records live under an s3:// output as well: written by a read task, listed and
    cleared by the driver (a moto server, no network)."""
    from support.moto_output import output_on_s3

    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "part.parquet")
    with output_on_s3(monkeypatch, str(tmp_path / "part.parquet")) as endpoint:
        opts = S3Options(endpoint=endpoint)
        path = write_rows(tmp_path / "in.parquet", ["a", "b", "c", "d"], row_group_size=2)
        garble_row_group(path, 0, "question")
        source = ParquetRowsDatasource([str(path)], ["question"], "id", opts, report_to="s3://jobs/run1")
        assert read_all(source, path).column("id").to_pylist() == ["c", "d"]
        (record,) = unreadable_records("s3://jobs/run1", opts)
        assert (record["row_group"], record["rows"]) == (0, 2)
        clear_unreadable("s3://jobs/run1", opts)
        assert unreadable_records("s3://jobs/run1", opts) == []


def test_generated_ids_do_not_change_when_another_input_file_is_removed(tmp_path):
    """Ids are FILE#ROW relative to the --input, not to the files found: removing an
    unreadable file before a resume leaves the other files' ids as the checkpoint has them."""
    for name in ("a/x.parquet", "a/y.parquet", "b/bad.parquet"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        write_rows(tmp_path / "in" / name, ["r"])

    def ids(*inputs):
        files = list_parquet_files(list(inputs), S3Options())
        source = ParquetRowsDatasource(files, ["question"], None, S3Options(), root=id_root(list(inputs), files))
        return [i for f in files for i in read_all(source, f).column("id").to_pylist()]

    d = str(tmp_path / "in")
    assert ids(d) == ["a/x.parquet#0", "a/y.parquet#0", "b/bad.parquet#0"]
    (tmp_path / "in/b/bad.parquet").unlink()
    assert ids(d) == ["a/x.parquet#0", "a/y.parquet#0"]  # the files' common path would make them x.parquet#0, ...
    assert ids(f"{d}/a/*.parquet") == ids(f"{d}/a/x.parquet", f"{d}/a/y.parquet") == ["x.parquet#0", "y.parquet#0"]
    assert ids(f"{d}/a/x.parquet") == ["x.parquet#0"]


def test_http_image_reads_while_an_s3_endpoint_is_set(tmp_path):
    """--s3-endpoint's options are S3 options: an http(s) image must not receive them."""
    import functools
    import http.server
    import threading

    Image.new("RGB", (40, 30), "red").save(tmp_path / "x.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
        opts = fsspec_options(S3Options(endpoint="http://127.0.0.1:9"))
        img, err = decode_image(url, storage_options=opts)
        assert err is None and img.size == (40, 30)
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_a_footer_is_read_from_a_files_last_bytes_or_the_long_way():
    """S3 footers come from one suffix-range GET (``sources.footer_from_tail``): the same
    schema and row count as pyarrow's own read; None (the long way) when the bytes do not
    hold the whole footer or are no Parquet."""
    import io

    from hired_batch.job.sources import FOOTER_TAIL_BYTES, footer_from_tail

    def parquet(table):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    for table in (
        pa.table({"id": ["a"], "n": pa.array([1], pa.int32())}),
        pa.table({"id": [f"r{i}" for i in range(50_000)]}),
    ):
        data = parquet(table)
        assert footer_from_tail(data[-FOOTER_TAIL_BYTES:]) == (pq.read_schema(pa.BufferReader(data)), table.num_rows)
    wide = parquet(pa.table({f"column_{i:05d}": [i] for i in range(3000)}))  # a footer over 64 KiB
    assert footer_from_tail(wide[-FOOTER_TAIL_BYTES:]) is None
    assert footer_from_tail(b"") is None and footer_from_tail(data[:1000]) is None
