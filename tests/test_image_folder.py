"""A folder of images as the input (issue 21 item 3, ``job/image_folder.py``): one row per
image file, its id the path relative to the folder; a folder mixing Parquet and images,
or holding neither, refused before Ray starts."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.cli import run_before_ray

from hired_batch.config import ConfigError
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.job.image_folder import IMAGE_SUFFIXES, image_folder, relative_ids
from hired_batch.job.options import job_from_options

# (relative path, PIL format or a kind of broken file): every suffix, upper case, nested folders
GOOD = [
    ("a.jpg", "JPEG"),
    ("b.JPEG", "JPEG"),
    ("c.png", "PNG"),
    ("d.PNG", "PNG"),
    ("e.webp", "WEBP"),
    ("f.gif", "GIF"),
    ("g.bmp", "BMP"),
    ("h.tiff", "TIFF"),
    ("i.TIF", "TIFF"),
    ("sub/j.jpg", "JPEG"),
    ("sub/k.Png", "PNG"),
    ("sub/deeper/l.JPG", "JPEG"),
    ("sub/deeper/m.webp", "WEBP"),
    ("sub/deeper/even/n.gif", "GIF"),
]
BROKEN = [
    ("broken/garbage.jpg", b"this is not an image"),
    ("broken/empty.png", b""),
    ("sub/truncated.PNG", None),  # a PNG cut in half
    ("sub/deeper/text.GIF", b"GIF? no, text"),
]
NOT_IMAGES = ["notes.txt", "sub/.DS_Store", "sub/deeper/README"]


def encoded(fmt: str, seed: int, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    make_synthetic_image(*size, seed).save(buf, fmt)
    return buf.getvalue()


def make_folder(root, good=GOOD, broken=BROKEN, repeat=1) -> list[str]:
    """Write the images (``good`` ``repeat`` times, under r0/, r1/... when > 1) and the
    files that are not images; returns every image's path relative to ``root``."""
    names = []
    for r in range(repeat):
        prefix = f"r{r}/" if repeat > 1 else ""
        for i, (name, fmt) in enumerate(good):
            (root / prefix / name).parent.mkdir(parents=True, exist_ok=True)
            (root / prefix / name).write_bytes(encoded(fmt, 100 * r + i))
            names.append(prefix + name)
    for name, data in broken:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data if data is not None else image_to_bytes(make_synthetic_image(80, 60, 7))[:200])
        names.append(name)
    for name in NOT_IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not an image")
    return names


def folder_job(folder, out, **more):
    return job_from_options(
        {"input": str(folder), "output": str(out), "question_column": "none", "prompt": "Describe it.", **more}
    )


def test_every_image_file_is_listed_once_with_its_relative_path_as_id(tmp_path):
    names = make_folder(tmp_path / "imgs")
    folder, images = image_folder(folder_job(tmp_path / "imgs", tmp_path / "out"))
    assert sorted(relative_ids(folder, images)) == sorted(names)
    assert all(f.startswith(str(tmp_path / "imgs")) for f in images)  # full paths: the stage opens them
    assert {n.rsplit(".", 1)[-1].lower() for n in names} == {s[1:] for s in IMAGE_SUFFIXES}


def test_parquet_input_is_no_image_folder(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"]}), tmp_path / "in/a.parquet")
    assert image_folder(job_from_options({"input": str(tmp_path / "in"), "output": str(tmp_path / "o")})) is None


@pytest.mark.slow  # starts moto's S3 server (no Ray)
def test_a_folder_on_s3_is_listed_like_a_local_one(tmp_path):
    import os

    import boto3
    from support.s3_fault_proxy import FAKE_AWS, MotoS3

    names = make_folder(tmp_path / "imgs")
    old = {k: os.environ.get(k) for k in FAKE_AWS}
    os.environ.update(FAKE_AWS)
    try:
        with MotoS3() as url:
            s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
            s3.create_bucket(Bucket="photos")
            for f in (tmp_path / "imgs").rglob("*"):
                if f.is_file():
                    s3.put_object(Bucket="photos", Key=f"set/{f.relative_to(tmp_path / 'imgs')}", Body=f.read_bytes())
            job = folder_job("s3://photos/set/", "s3://photos/out", s3_endpoint=url)
            folder, images = image_folder(job)
            assert sorted(relative_ids(folder, images)) == sorted(names)
            assert all(f.startswith("s3://photos/set/") for f in images)
            s3.put_object(Bucket="photos", Key="set/shard.parquet", Body=b"PAR1")
            with pytest.raises(ConfigError, match="holds both Parquet files"):
                image_folder(job)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _args(tmp_path, tiny, *extra):
    return ["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"), "--model", str(tiny), *extra]


CAPTION = ("--question-column", "none", "--prompt", "Describe it.")


def test_a_folder_mixing_parquet_and_images_is_refused_before_ray(capsys, tmp_path, tiny_next):
    make_folder(tmp_path / "imgs")
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"]}), tmp_path / "imgs/sub/rows.parquet")
    code, err = run_before_ray(capsys, *_args(tmp_path, tiny_next, *CAPTION))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds both Parquet files (1, e.g." in err and "rows.parquet" in err and "image files (18, e.g." in err


def test_a_folder_with_neither_parquet_nor_images_is_refused_before_ray(capsys, tmp_path, tiny_next):
    make_folder(tmp_path / "imgs", good=[], broken=[])
    code, err = run_before_ray(capsys, *_args(tmp_path, tiny_next, *CAPTION))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds no Parquet files and no image files (3 other file(s))" in err and "jpg" in err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ((), "which has no question column 'question': give --question-column none"),
        ((*CAPTION, "--id-column", "key"), "--id-column key does not apply to a folder of images"),
        ((*CAPTION, "--keep-column", "label"), "column(s) ['label'] not found in"),
        (("--task", "textvqa", *CAPTION), "not found in"),
    ],
)
def test_options_that_read_columns_a_folder_lacks_are_refused_before_ray(capsys, tmp_path, tiny_next, extra, fragment):
    make_folder(tmp_path / "imgs")
    code, err = run_before_ray(capsys, *_args(tmp_path, tiny_next, *extra))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert fragment in err


def test_an_output_inside_the_folder_is_refused_before_ray(capsys, tmp_path, tiny_next):
    make_folder(tmp_path / "imgs")
    code, err = run_before_ray(
        capsys,
        "--input",
        str(tmp_path / "imgs"),
        "--output",
        str(tmp_path / "imgs/out"),
        "--model",
        str(tiny_next),
        *CAPTION,
    )
    assert code == 2 and "is inside input" in err


@pytest.mark.slow
def test_a_folder_of_images_is_captioned_every_file_exactly_once_and_resumes(tmp_path, tiny_next, capsys):
    """30 images (4 broken, nested, upper-case suffixes) in: every file exactly once, the
    broken ones as error rows; 3 images added and the same command rerun with
    --checkpoint adds exactly those; --overwrite starts over with every file once."""
    import ray

    from hired_batch.cli import main

    good = GOOD + [(f"more/{n}", f) for n, f in GOOD[:12]]
    names = make_folder(tmp_path / "imgs", good=good)
    assert len(names) == 30
    argv = ["run", *_args(tmp_path, tiny_next, *CAPTION), "--checkpoint", str(tmp_path / "ck")]
    argv += ["--max-new-tokens", "2", "--batch-size", "8", "--budget", "0.2"]
    broken = {n for n, _ in BROKEN}

    def output():
        t = pq.read_table(tmp_path / "out", columns=["id", "error"])
        return dict(zip(t.column("id").to_pylist(), t.column("error").to_pylist())), t.num_rows

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        assert main(argv) == 0
        errors, rows = output()
        assert rows == 30 and sorted(errors) == sorted(names)  # every file, exactly once
        assert {n for n, e in errors.items() if e is not None} == broken
        assert all(errors[n].startswith("image:") for n in broken), errors
        capsys.readouterr()

        added = ["late.JPG", "sub/late.png", "more/deeper/late.webp"]
        for i, n in enumerate(added):
            (tmp_path / "imgs" / n).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "imgs" / n).write_bytes(encoded(n.rsplit(".", 1)[-1].upper().replace("JPG", "JPEG"), 900 + i))
        assert main(argv) == 0  # the same command: the checkpoint skips the 30 already written
        assert "this run: 3 rows" in capsys.readouterr().out
        errors, rows = output()
        assert rows == 33 and sorted(errors) == sorted(names + added)

        assert main([*argv, "--overwrite"]) == 0
        errors, rows = output()
        assert rows == 33 and sorted(errors) == sorted(names + added)
        assert {n for n, e in errors.items() if e is not None} == broken
    finally:
        ray.shutdown()
