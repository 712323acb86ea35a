"""Ids present and unique at any size (issue 22 item 1, ``job/id_check.py``): many small
shards get the same refusals whatever the pool's size; a large input's ids are checked by
Ray tasks, never read by the driver."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.cli import run_before_ray

from hired_batch.config import ConfigError
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.job import id_check, sources
from hired_batch.job.options import job_from_options
from hired_batch.job.preflight import preflight

IMG = image_to_bytes(make_synthetic_image(32, 24, 0))
N_SHARDS = 240


def many_shards(root, rows=3, ids=None):
    """``N_SHARDS`` small shards under root/in; ``ids(shard)`` -> that shard's ids."""
    (root / "in").mkdir(parents=True, exist_ok=True)
    for s in range(N_SHARDS):
        shard_ids = ids(s) if ids else [f"s{s}-r{r}" for r in range(rows)]
        n = len(shard_ids)
        pq.write_table(
            pa.table({"id": pa.array(shard_ids, pa.string()), "image": [IMG] * n, "question": ["q"] * n}),
            root / f"in/part-{s:04d}.parquet",
        )
    return root


def args(root, model, *extra):
    return ["--input", str(root / "in"), "--output", str(root / "out"), "--model", str(model), *extra]


def refusal_with_threads(capsys, monkeypatch, threads, argv):
    monkeypatch.setattr(sources, "FOOTER_THREADS", threads)
    code, err = run_before_ray(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def garble(path):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # no footer


@pytest.mark.parametrize(
    "spoil, fragment",
    [
        ("duplicate", "2 duplicate id(s) in 240 input file(s)"),
        ("nulls", "is null in {root}/in/part-0100.parquet row 1"),
        ("footer", "input file {root}/in/part-0050.parquet is not a readable Parquet file"),
        ("column", "column(s) ['question'] not found in {root}/in/part-0070.parquet"),
    ],
)
def test_many_small_shards_get_the_same_refusal_from_one_thread_or_a_pool(
    capsys, monkeypatch, tmp_path, tiny_next, spoil, fragment
):
    """Two problems in each input, the earlier shard's is named, whatever the pool's size."""
    many_shards(tmp_path)
    if spoil == "duplicate":  # shard 3's first id again in shards 200 and 239
        for s in (200, 239):
            pq.write_table(
                pa.table({"id": ["s3-r0"], "image": [IMG], "question": ["q"]}), tmp_path / f"in/part-{s:04d}.parquet"
            )
    elif spoil == "nulls":
        for s in (100, 180):
            pq.write_table(
                pa.table({"id": pa.array(["a", None], pa.string()), "image": [IMG] * 2, "question": ["q"] * 2}),
                tmp_path / f"in/part-{s:04d}.parquet",
            )
    elif spoil == "footer":
        garble(tmp_path / "in/part-0050.parquet")
        garble(tmp_path / "in/part-0150.parquet")
    else:
        for s in (70, 170):
            pq.write_table(pa.table({"id": [f"x{s}"], "image": [IMG]}), tmp_path / f"in/part-{s:04d}.parquet")
    errs = {t: refusal_with_threads(capsys, monkeypatch, t, args(tmp_path, tiny_next)) for t in (1, 8, 64)}
    assert len(set(errs.values())) == 1, errs  # concurrency changes no refusal
    assert fragment.format(root=tmp_path) in errs[1], errs[1]
    if spoil == "duplicate":
        assert "'s3-r0'" in errs[1]


def test_a_large_input_is_not_read_by_the_driver_before_ray(monkeypatch, tmp_path):
    """Above ``IDS_CHECKED_IN_DRIVER`` rows preflight reads footers only: the id reader is
    never called in the driver (a duplicate passes here; the Ray pass refuses it)."""
    many_shards(tmp_path, ids=lambda s: ["same"])  # 240 rows, every id the same

    def no_reading(*a, **k):
        raise AssertionError("the driver read ids")

    job = job_from_options({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="239 duplicate id"):
        preflight(job)  # small: checked here
    monkeypatch.setattr(id_check, "IDS_CHECKED_IN_DRIVER", 100)
    monkeypatch.setattr(id_check, "file_ids", no_reading)
    preflight(job)  # large: footers only


def test_the_ray_pass_takes_the_files_preflight_listed(monkeypatch, tmp_path):
    """After preflight the Ray pass neither lists the input nor reads its footers again
    (2,000 S3 shards: tens of seconds); without preflight it lists them itself."""
    many_shards(tmp_path)
    monkeypatch.setattr(id_check, "IDS_CHECKED_IN_DRIVER", 100)
    job = job_from_options({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")})
    listed = sources.list_parquet_files([job.inputs[0]], job.s3)
    checked = []
    monkeypatch.setattr(id_check, "check_ids_on_ray", lambda files, j: checked.append(files))
    preflight(job)
    with monkeypatch.context() as m:
        m.setattr(sources, "list_parquet_files", lambda *a: pytest.fail("listed again"))
        m.setattr(sources, "parquet_footers", lambda *a: pytest.fail("footers read again"))
        id_check.check_large_input_ids(job)
    id_check.check_large_input_ids(job)  # once only: a second job lists for itself
    assert checked == [listed, listed] and len(listed) == 240


def test_duplicates_in_counts_each_repeat_over_every_map():
    t1 = pa.table({"id": ["a", "b", "c", "a"], "bucket": pa.array([0, 1, 0, 0], pa.uint16())})
    t2 = pa.table({"id": ["c", "d", "a"], "bucket": pa.array([0, 1, 0], pa.uint16())})
    assert id_check.duplicates_in(0, t1, t2) == (3, ["a", "c"])  # a thrice (2 repeats), c twice (1)
    assert id_check.duplicates_in(1, t1, t2) == (0, [])


@pytest.mark.slow
def test_the_ray_pass_refuses_what_the_driver_would_without_reading_ids(monkeypatch, tmp_path, tiny_next, capsys):
    """On Ray: a duplicate across shards, a null id and clean ids give the driver's verdicts
    (same lines), with the driver's id reader disabled; the CLI refuses a large input's
    duplicates with one line and exit 2 before writing anything."""
    import ray

    from hired_batch.cli import main

    def no_reading(*a, **k):
        raise AssertionError("the driver read ids")

    clean = many_shards(tmp_path / "clean")
    dup = many_shards(tmp_path / "dup", ids=lambda s: [f"s{s}", "twice" if s in (7, 230) else f"t{s}"])
    null = many_shards(tmp_path / "null", ids=lambda s: ["a", None] if s == 99 else [f"s{s}"])
    jobs = {
        k: job_from_options({"input": str(d / "in"), "output": str(d / "out")})
        for k, d in (("clean", clean), ("dup", dup), ("null", null))
    }
    verdicts = {}
    for k, job in jobs.items():  # in the driver first (small), the reference
        try:
            id_check.check_ids_in_driver(sources.list_parquet_files([job.inputs[0]], job.s3), job)
            verdicts[k] = None
        except ConfigError as e:
            verdicts[k] = str(e)
    assert verdicts["clean"] is None and "1 duplicate id(s) in 240 input file(s), e.g. ['twice']" in verdicts["dup"]
    assert f"null in {null}/in/part-0099.parquet row 1" in verdicts["null"]
    monkeypatch.setattr(id_check, "file_ids", no_reading)
    monkeypatch.setattr(id_check, "IDS_CHECKED_IN_DRIVER", 0)
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        for k, job in jobs.items():
            files = sources.list_parquet_files([job.inputs[0]], job.s3)
            if verdicts[k] is None:
                id_check.check_ids_on_ray(files, job)
            else:
                with pytest.raises(ConfigError) as e:
                    id_check.check_ids_on_ray(files, job)
                assert str(e.value) == verdicts[k]
        capsys.readouterr()
        assert main(["run", *args(dup, tiny_next)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "1 duplicate id(s) in 240 input file(s)" in err, err
        assert not list((dup / "out").glob("*.parquet"))
    finally:
        ray.shutdown()


def _shard(rows: int, row_group_size: int, image_bytes: int = 20_000, ids=None) -> bytes:
    """A Parquet file with large images before the id column, as users' shards are."""
    import io
    import random

    ids = ids if ids is not None else [f"id-{i}" for i in range(rows)]
    t = pa.table(
        {"image": [random.Random(i).randbytes(image_bytes) for i in range(rows)], "id": ids, "question": ["q"] * rows}
    )
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=row_group_size)
    return buf.getvalue()


@pytest.mark.parametrize("row_group_size", [7, 100])
def test_ids_from_ranges_fetches_the_id_pages_only(row_group_size):
    data = _shard(40, row_group_size)
    fetched = []

    def fetch(a, b):
        fetched.append((a, b))
        return data[a:b]

    tail = data[-sources.FOOTER_TAIL_BYTES :]
    assert len(tail) < len(data)  # the images make the file larger than the tail
    ids = id_check.ids_from_ranges(tail, fetch, "id")
    assert ids.to_pylist() == [f"id-{i}" for i in range(40)]
    assert len(fetched) == -(-40 // row_group_size)  # one fetch per row group
    assert sum(b - a for a, b in fetched) < len(data) / 50  # the images are never read
    assert id_check.ids_from_ranges(tail, fetch, "nope") is None
    assert id_check.ids_from_ranges(b"not parquet", fetch, "id") is None


def test_ids_from_ranges_reads_integer_ids_as_text():
    data = _shard(5, 100, image_bytes=10, ids=list(range(10, 15)))
    assert id_check.ids_from_ranges(data, lambda a, b: data[a:b], "id").to_pylist() == ["10", "11", "12", "13", "14"]


def test_s3_ids_read_on_a_real_s3_server_equal_pyarrows(tmp_path, monkeypatch):
    import boto3
    from support.s3_fault_proxy import MotoS3

    from hired_batch.config import S3Options

    for k, v in dict(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    ).items():
        monkeypatch.setenv(k, v)
    data = _shard(30, 8)
    (tmp_path / "a.parquet").write_bytes(data)
    with MotoS3() as url:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="ids")
        s3.put_object(Bucket="ids", Key="in/a.parquet", Body=data)
        opts = S3Options(endpoint=url)
        fast = id_check.s3_ids("s3://ids/in/a.parquet", "id", opts)
        assert fast is not None and fast.to_pylist() == [f"id-{i}" for i in range(30)]
        assert id_check.file_ids("s3://ids/in/a.parquet", "id", opts).equals(fast)
        assert id_check.s3_ids("s3://ids/in/missing.parquet", "id", opts) is None  # the long way names it
        with pytest.raises(ConfigError, match="missing.parquet"):
            id_check.file_ids("s3://ids/in/missing.parquet", "id", opts)
    assert id_check.file_ids(str(tmp_path / "a.parquet"), "id", S3Options()).equals(fast)
