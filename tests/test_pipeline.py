"""The whole job on an embedded local Ray (num_gpus=1: the GPU-actor path runs on CPU).

Inputs the pipeline must handle: odd column names, no id column, mixed image sizes
and formats, bad rows, a directory of several files, a Hugging Face save_to_disk
dataset, and s3:// input and output on a real S3 protocol server (moto).
"""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.s3_fault_proxy import MotoS3

from hired_batch.cli import main
from hired_batch.engine.inputs import decode_image, image_to_bytes, make_synthetic_image
from hired_batch.job.stages import OUTPUT_FIELDS

COMMON = ["--max-new-tokens", "3", "--batch-size", "4", "--budget", "0.2"]


FAKE_AWS = dict(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1"
)


@pytest.fixture(scope="module")
def local_ray():
    import os

    import ray

    # Ray workers inherit the environment Ray starts with: the credentials the S3
    # tests' moto server accepts must be there before ray.init (the AWS chain).
    for k, v in FAKE_AWS.items():
        os.environ.setdefault(k, v)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def encoded(w, h, fmt, seed):
    img = make_synthetic_image(w, h, seed)
    if fmt == "PNG":
        return image_to_bytes(img)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def odd_table(n, offset=0):
    """Columns named like a real export: Img Bytes / Frage / GT; no id column."""
    sizes = [(336, 336), (800, 300), (300, 900), (640, 480), (1000, 1000)]
    fmts = ["PNG", "JPEG", "WEBP", "GIF", "PNG"]
    rows = [
        {
            "Img Bytes": encoded(*sizes[i % 5], fmts[i % 5], offset + i),
            "Frage": f"Question {offset + i}?",
            "GT": f"answer-{offset + i}",
            "extra": i,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows)


def read_output(path, filesystem=None):
    return pq.read_table(path, filesystem=filesystem) if filesystem else pq.read_table(path)


def check_schema(t):
    for name, typ in OUTPUT_FIELDS.items():
        assert t.schema.field(name).type == typ, name


@pytest.mark.slow
def test_parquet_dir_with_odd_columns_and_bad_rows(local_ray, tiny_next, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(odd_table(5), src / "part-0.parquet")
    bad = odd_table(3, offset=5).to_pylist()
    bad[0]["Img Bytes"] = b"definitely not an image"
    bad[1]["Frage"] = None
    pq.write_table(pa.Table.from_pylist(bad), src / "part-1.parquet")
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--input",
            str(src),
            "--output",
            str(out),
            "--model",
            str(tiny_next),
            "--image-column",
            "Img Bytes",
            "--question-column",
            "Frage",
            "--keep-column",
            "GT",
        ]
        + COMMON
    )
    assert code == 0
    t = read_output(out)
    check_schema(t)
    ids = t.column("id").to_pylist()
    assert sorted(ids) == sorted([f"part-0.parquet#{i}" for i in range(5)] + [f"part-1.parquet#{i}" for i in range(3)])
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert "not an image" in by_id["part-1.parquet#0"]["error"]
    assert by_id["part-1.parquet#1"]["error"].startswith("question:")
    assert by_id["part-1.parquet#2"]["error"] is None and by_id["part-1.parquet#2"]["GT"] == "answer-7"
    ok = [r for r in t.to_pylist() if r["error"] is None]
    assert len(ok) == 6 and all(r["answer"] is not None and r["n_visual_tokens_kept"] > 0 for r in ok)
    assert all(r["n_visual_tokens_kept"] < r["n_visual_tokens_full"] for r in ok)
    printed = capsys.readouterr().out
    assert "rows: 8 (ok 6, failed 2)" in printed and str(out) in printed


@pytest.mark.slow
def test_shards_whose_types_differ_only_in_width_run(local_ray, tiny_next, tmp_path, capsys):
    """What preflight accepts (docs/guarantees.md: several input files) the job reads: int and text ids,
    string/large_string, binary/large_binary, int32/int64 and all-null columns."""
    src = tmp_path / "in"
    src.mkdir()
    img = encoded(336, 336, "PNG", 0)
    pq.write_table(
        pa.table(
            {
                "id": pa.array([1, 2], pa.int64()),
                "image": pa.array([img, img], pa.binary()),
                "question": pa.array(["a?", "b?"], pa.string()),
                "n": pa.array([1, 2], pa.int32()),
                "note": ["p", "q"],
                "extra": [0.5, 1.5],
            }
        ),
        src / "a.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": pa.array(["x"]),
                "image": pa.array([img], pa.large_binary()),
                "question": pa.array(["c?"], pa.large_string()),
                "n": pa.array([3], pa.int64()),
                "note": pa.array([None], pa.null()),
            }
        ),
        src / "b.parquet",
    )
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--input",
            str(src),
            "--output",
            str(out),
            "--model",
            str(tiny_next),
            "--keep-column",
            "n",
            "--keep-column",
            "note",
        ]
        + COMMON
    )
    assert code == 0
    t = read_output(out)
    assert sorted(t.column("id").to_pylist()) == ["1", "2", "x"]
    assert t.column("error").null_count == 3
    assert {r["id"]: (r["n"], r["note"]) for r in t.to_pylist()} == {"1": (1, "p"), "2": (2, "q"), "x": (3, None)}


@pytest.mark.slow
def test_hf_save_to_disk_dataset(local_ray, tiny_llava, tmp_path):
    import datasets

    imgs = [make_synthetic_image(320 + 10 * i, 240, i) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "question": [f"What {i}?" for i in range(4)], "qid": [10, 11, 12, 13]},
        features=datasets.Features(
            {"image": datasets.Image(), "question": datasets.Value("string"), "qid": datasets.Value("int64")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "hfds"))
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--input",
            str(tmp_path / "hfds"),
            "--output",
            str(out),
            "--model",
            str(tiny_llava),
            "--id-column",
            "qid",
            "--selector",
            "spatial",
        ]
        + COMMON
    )
    assert code == 0
    t = read_output(out)
    check_schema(t)
    assert sorted(t.column("id").to_pylist()) == ["10", "11", "12", "13"]
    assert t.column("error").null_count == 4
    assert set(t.column("n_visual_tokens_kept").to_pylist()) == {round(0.2 * 576)}


@pytest.fixture(scope="module")
def s3_server():
    with MotoS3() as url:
        yield url


@pytest.mark.slow
def test_s3_input_and_output(local_ray, tiny_next, s3_server, monkeypatch):
    import boto3
    import pyarrow.fs as pafs

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="imgs/far.png", Body=image_to_bytes(make_synthetic_image(500, 400, 9)))
    rows = odd_table(4).to_pylist()
    rows[3]["Img Bytes"] = None
    table = pa.Table.from_pylist(
        [{"key": f"k{i}", "img": r["Img Bytes"], "q": r["Frage"], "path": None} for i, r in enumerate(rows)]
    )
    table = table.append_column("ref", pa.array([None, None, None, "s3://data/imgs/far.png"]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.put_object(Bucket="data", Key="in/shard-0.parquet", Body=buf.getvalue())
    code = main(
        [
            "run",
            "--input",
            "s3://data/in/",
            "--output",
            "s3://data/out",
            "--model",
            str(tiny_next),
            "--id-column",
            "key",
            "--image-column",
            "img",
            "--question-column",
            "q",
            "--s3-endpoint",
            s3_server,
        ]
        + COMMON
    )
    assert code == 0
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1")
    t = pq.read_table("data/out", filesystem=fs)
    check_schema(t)
    assert sorted(t.column("id").to_pylist()) == ["k0", "k1", "k2", "k3"]
    errs = dict(zip(t.column("id").to_pylist(), t.column("error").to_pylist()))
    assert errs["k3"].startswith("image: empty") and errs["k0"] is None


@pytest.mark.slow
def test_image_urls_are_opened_through_fsspec_and_a_hanging_one_times_out(local_ray, tiny_next, s3_server, tmp_path):
    """s3:// and http:// image URLs in one job; one http URL never answers (held back until the
    test ends): with --image-timeout 1 its row is an error row after two tries, and the rows
    after it in its batch are answered."""
    import boto3
    from support.gated_images import GatedImages

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="imgs")
    s3.put_object(Bucket="imgs", Key="a.png", Body=image_to_bytes(make_synthetic_image(500, 400, 9)))
    with GatedImages(tmp_path / "served") as web:
        png = image_to_bytes(make_synthetic_image(300, 200, 3))
        hang, fine = web.add("hang.png", png, gated=True), web.add("fine.png", png, gated=False)
        pq.write_table(
            pa.table(
                {
                    "id": ["a", "gone", "hang", "after"],
                    "image": ["s3://imgs/a.png", "s3://imgs/missing.png", hang + "?sig=SECRET", fine],
                    "question": ["What?"] * 4,
                }
            ),
            tmp_path / "refs.parquet",
        )
        code = main(
            [
                "run",
                "--input",
                str(tmp_path / "refs.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_next),
                "--s3-endpoint",
                s3_server,
                "--image-timeout",
                "1",
            ]
            + COMMON
        )
    assert code == 0
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert rows["a"]["error"] is None and "cannot open s3://imgs/missing.png" in rows["gone"]["error"]
    assert rows["hang"]["error"] == f"image: timed out after 1 s (2 tries): {hang}"
    assert rows["after"]["error"] is None and rows["after"]["answer"] is not None  # same batch (--batch-size 4)
    # the gate would have served the hanging image after 300 s: the row was given up long before
    assert rows["hang"]["t_preprocess_s"] < 60, rows["hang"]["t_preprocess_s"]


@pytest.mark.slow
def test_yaml_config_with_flag_override(local_ray, tiny_next, tmp_path):
    pq.write_table(
        pa.table(
            {
                "id": ["x", "y"],
                "image": [encoded(400, 300, "PNG", 1), encoded(300, 400, "JPEG", 2)],
                "question": ["A?", "B?"],
            }
        ),
        tmp_path / "in.parquet",
    )
    (tmp_path / "job.yaml").write_text(
        f"input: {tmp_path / 'in.parquet'}\noutput: {tmp_path / 'out'}\nmodel: {tiny_next}\n"
        "budget: 0.5\nmax-new-tokens: 2\nselector: random\ngenerate-memory: 200MB\nvision-chunk: 2\n"
        "system-prompt: Be brief.\nstop: ['###']\nrepetition-penalty: 1.1\n"
    )
    assert main(["run", "--config", str(tmp_path / "job.yaml"), "--budget", "0.1", "--save-indices"]) == 0
    # a rerun into the same directory replaces the old files instead of appending
    assert (
        main(["run", "--config", str(tmp_path / "job.yaml"), "--budget", "0.1", "--save-indices", "--overwrite"]) == 0
    )
    t = read_output(tmp_path / "out")
    assert sorted(t.column("id").to_pylist()) == ["x", "y"]
    assert t.column("budget").to_pylist() == [0.1, 0.1] and set(t.column("selector").to_pylist()) == {"random"}
    kept = t.column("n_visual_tokens_kept").to_pylist()
    assert [len(k) for k in t.column("kept_indices").to_pylist()] == kept
    # the system prompt reached every row's prompt ids (one <image> id became the kept tokens)
    from hired_batch.engine.weights import Preprocessor

    pre = Preprocessor.from_pretrained(str(tiny_next), "Be brief.")
    text = {i: len(pre.tokenizer(pre.prompt(q))["input_ids"]) - 1 for i, q in (("x", "A?"), ("y", "B?"))}
    assert {r["id"]: r["n_prompt_tokens"] - r["n_visual_tokens_kept"] for r in t.to_pylist()} == text


def test_generation_actor_resources():
    from hired_batch.config import Resources
    from hired_batch.job.resources import generate_remote_args

    gpu = generate_remote_args(Resources(gpus_per_actor=1.0, generate_cpus=0.5, generate_memory="1GB"))
    assert gpu == dict(num_gpus=1.0, num_cpus=0.5, memory=10**9)  # no thread override on GPU actors
    assert "memory" not in generate_remote_args(Resources(gpus_per_actor=1.0))
    with pytest.raises(ValueError, match="memory size must look like"):
        Resources(generate_memory="a lot").check()


def test_window_flag_sets_the_auto_batch_window():
    """--window (YAML ``window``) reaches Resources.window, the Ray batch an actor
    groups by prompt length and so the largest auto batch; < 1 is refused."""
    import argparse

    from hired_batch.config import ConfigError, Resources
    from hired_batch.job import job_from_options, runner

    def job(*flags):
        p = argparse.ArgumentParser()
        runner.add_run_arguments(p)
        args = p.parse_args(["--input", "in.parquet", "--output", "out", "--batch-size", "auto", *flags])
        return job_from_options(runner.job_options(runner.merged_options(args)))

    assert job().resources.window == Resources.window
    assert job("--window", "256").resources.window == 256
    with pytest.raises(ConfigError, match="window must be >= 1"):
        job("--window", "0")


@pytest.mark.slow
def test_generate_memory_no_node_can_give_is_refused(local_ray, tiny_next, tmp_path, capsys):
    pq.write_table(
        pa.table({"id": ["x"], "image": [encoded(300, 300, "PNG", 1)], "question": ["A?"]}), tmp_path / "in.parquet"
    )
    code = main(
        [
            "run",
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_next),
            "--generate-memory",
            "100TB",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "more than any node can reserve" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.slow
def test_task_preset_run_then_score(local_ray, tiny_llava, tmp_path, capsys):
    rows = [
        dict(
            image=encoded(400, 300, "PNG", i),
            question=f"Which shape is {i}?",
            hint="Shapes." if i else "",
            choices=["circle", "square"],
            answer=i % 2,
            subject="geometry",
        )
        for i in range(4)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sqa.parquet")
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "--task",
                "scienceqa_img",
                "--input",
                str(tmp_path / "sqa.parquet"),
                "--output",
                str(out),
                "--model",
                str(tiny_llava),
                "--max-new-tokens",
                "2",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    t = read_output(out)
    assert {"gt_answer", "choices", "subject"} <= set(t.column_names)
    assert t.column("error").null_count == 4
    capsys.readouterr()
    assert main(["score", str(out), "--task", "scienceqa_img"]) == 0
    assert "scienceqa_img" in capsys.readouterr().out


def checkpoint_files(list_names, suffix=".parquet"):
    """Committed checkpoint file names (Ray writes STEM.pending.parquet first, then renames)."""
    return sorted(n for n in list_names if n.endswith(suffix) and not n.endswith(".pending.parquet"))


@pytest.mark.slow
def test_s3_resume_after_an_uncommitted_write_adds_only_its_rows(local_ray, tiny_next, s3_server, capsys):
    """A driver that died between writing an output file and committing its checkpoint
    leaves STEM.pending.parquet; the resume deletes that file's data and redoes its rows.
    On S3 the summary must list the output afresh (it once read a cached listing that
    still named the deleted file and exited 2 with a bare path)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="vqa")
    for shard in range(2):
        buf = io.BytesIO()
        pq.write_table(
            odd_table(4, offset=4 * shard).append_column("key", pa.array([f"k{4 * shard + i}" for i in range(4)])), buf
        )
        s3.put_object(Bucket="vqa", Key=f"in/shard-{shard}.parquet", Body=buf.getvalue())
    cmd = [
        "run",
        "--input",
        "s3://vqa/in/",
        "--output",
        "s3://vqa/out/",
        "--checkpoint",
        "s3://vqa/ckpt/",
        "--model",
        str(tiny_next),
        "--id-column",
        "key",
        "--image-column",
        "Img Bytes",
        "--question-column",
        "Frage",
        "--s3-endpoint",
        s3_server,
    ] + COMMON
    assert main(cmd) == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="vqa", Prefix="ckpt/")["Contents"]]
    committed = checkpoint_files(k.rsplit("/", 1)[-1] for k in keys)
    assert len(committed) >= 2, committed
    undone = committed[0]  # as if the driver died before committing this file's checkpoint
    ids_undone = pq.read_table(io.BytesIO(s3.get_object(Bucket="vqa", Key=f"ckpt/{undone}")["Body"].read()))
    s3.copy_object(
        Bucket="vqa",
        Key=f"ckpt/{undone[: -len('.parquet')]}.pending.parquet",
        CopySource={"Bucket": "vqa", "Key": f"ckpt/{undone}"},
    )
    s3.delete_object(Bucket="vqa", Key=f"ckpt/{undone}")
    capsys.readouterr()
    code = main(cmd)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert f"this run: {ids_undone.num_rows} rows" in out and "rows: 8 (" in out
    outputs = [
        o["Key"] for o in s3.list_objects_v2(Bucket="vqa", Prefix="out/")["Contents"] if o["Key"].endswith(".parquet")
    ]
    ids = [
        i
        for k in outputs
        for i in pq.read_table(io.BytesIO(s3.get_object(Bucket="vqa", Key=k)["Body"].read())).column("id").to_pylist()
    ]
    assert sorted(ids) == sorted(f"k{i}" for i in range(8))  # every row exactly once


@pytest.mark.slow
def test_summary_refuses_to_call_duplicate_rows_a_success(local_ray, tiny_next, tmp_path, capsys):
    import shutil

    pq.write_table(
        pa.table(
            {
                "id": ["x", "y"],
                "image": [encoded(300, 300, "PNG", 1), encoded(200, 300, "PNG", 2)],
                "question": ["A?", "B?"],
            }
        ),
        tmp_path / "in.parquet",
    )
    out = tmp_path / "out"
    cmd = [
        "run",
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(out),
        "--model",
        str(tiny_next),
        "--checkpoint",
        str(tmp_path / "ckpt"),
    ] + COMMON
    assert main(cmd) == 0
    first = sorted(out.glob("*.parquet"))[0]
    shutil.copy(first, out / f"{first.stem}-copy.parquet")  # a file copied by hand inside the output
    capsys.readouterr()
    assert main(cmd) == 1  # nothing to redo, but the output is no longer exactly once
    printed = capsys.readouterr()
    n = pq.read_metadata(first).num_rows
    assert "this run: 0 rows" in printed.out
    assert f"holds {2 + n} rows but only 2 distinct ids: {n} row(s) are duplicates" in printed.err


@pytest.mark.slow
def test_reference_mode_saved_indices_equal_the_engine_api(local_ray, tiny_next, tmp_path):
    """``run --mode reference --save-indices`` writes what the engine sends, every grid shape."""
    from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
    from hired_batch.engine.hf import HiredEngine

    sizes = [(672, 336), (336, 672), (900, 500), (1008, 336), (336, 1008)]  # (w, h): 1x2 2x1 2x2 1x3 3x1
    rows = [{"id": f"i{k}", "image": encoded(w, h, "PNG", k), "question": "What?"} for k, (w, h) in enumerate(sizes)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    assert (
        main(
            [
                "run",
                "--input",
                str(tmp_path / "in.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_next),
                "--mode",
                "reference",
                "--save-indices",
                "--budget",
                "0.2",
                "--max-new-tokens",
                "1",
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    got = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    sel = SelectionConfig(mode="reference", budget=0.2, save_indices=True)
    eng = HiredEngine.load(ModelConfig(path=str(tiny_next)), sel, GenerationConfig(max_new_tokens=1))
    items = eng.generate([decode_image(r["image"])[0] for r in rows], ["What?"] * len(rows)).items
    for r, item in zip(rows, items):
        assert got[r["id"]]["kept_indices"] == item["kept_indices"]
        assert len(item["kept_indices"]) == got[r["id"]]["n_visual_tokens_kept"] == item["n_visual_tokens_kept"]
