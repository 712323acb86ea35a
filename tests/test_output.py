"""Where the job writes (``job/output.py``): never into, over or around an input, never
a checkpoint inside its output, a location it cannot write refused before Ray, and a
write that fails midway (disk full) ends in one line with the resume command and no
unreadable file left behind. Through the CLI; Ray never starts for a refusal."""

import errno
import hashlib
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.cli import run_before_ray

from hired_batch.cli import main
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

STEM = "0359nr7rAesp13hqCMn0Pc_90782648f5984b67959f1538564dfb39_0000"  # + 2 digits: a Ray Data 2.60 write task's name


def write_input(path, ids):
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    if hasattr(path, "parent"):
        path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "image": [img] * len(ids), "question": ["q"] * len(ids)}), path)


def digests(root):
    """{relative path: sha256} of every file under ``root``: what must stay byte-identical."""
    return {
        os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(root)
        for f in files
    }


def ray_files(out, ckpt, task, ids, parts=1, committed=True):
    """The files one Ray Data write task leaves: data STEM-N.parquet, checkpoint STEM.parquet."""
    stem = f"{STEM}{task:02d}"
    out.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    for n, chunk in enumerate([ids[i::parts] for i in range(parts)]):
        pq.write_table(pa.table({"id": chunk}), out / f"{stem}-{n}.parquet")
    pq.write_table(pa.table({"id": ids}), ckpt / f"{stem}{'' if committed else '.pending'}.parquet")
    return stem


@pytest.fixture()
def inputs(tmp_path):
    """Input trees the issue's probes pointed the output or checkpoint at."""
    root = tmp_path / "in"
    for name in ("ow1", "ow3"):
        for k in range(3):
            write_input(root / name / f"part{k}.parquet", [f"{name}-{k}-{i}" for i in range(2)])
    write_input(root / "ow2" / "sub" / "part0.parquet", ["s0", "s1"])
    write_input(root / "ow2" / "other.parquet", ["o0"])
    write_input(root / "ckin2" / "part0.parquet", ["c0", "c1"])
    return root


@pytest.mark.parametrize("overwrite", [["--overwrite"], []])
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--input", "in/ow1/part0.parquet", "--output", "in/ow1"],
            "input 'in/ow1/part0.parquet' lies inside --output 'in/ow1'",
        ),
        (
            ["--input", "in/*/part1.parquet", "--output", "in/ow3"],
            "input file {root}/ow3/part1.parquet lies inside --output 'in/ow3'",
        ),
        (["--input", "in/ow2/sub", "--output", "in/ow2"], "input 'in/ow2/sub' lies inside --output 'in/ow2'"),
        (
            ["--input", "in/ow3/*.parquet", "--output", "in/ow3"],
            "input 'in/ow3/*.parquet' lies inside --output 'in/ow3'",
        ),
        (["--input", "in/ow1", "--output", "in/ow1"], "--output 'in/ow1' is input 'in/ow1'"),
        (["--input", "in/ow1", "--output", "in/ow1/answers"], "--output 'in/ow1/answers' is inside input 'in/ow1'"),
        (
            ["--input", "in/ckin2", "--output", "out", "--checkpoint", "in/ckin2"],
            "--checkpoint 'in/ckin2' is input 'in/ckin2'",
        ),
        (
            ["--input", "in/ckin2/part0.parquet", "--output", "out", "--checkpoint", "in"],
            "input 'in/ckin2/part0.parquet' lies inside --checkpoint 'in'",
        ),
        (
            ["--input", "in/ow1", "--output", "out", "--checkpoint", "in/ow1/ck"],
            "--checkpoint 'in/ow1/ck' is inside input",
        ),
    ],
)
def test_output_or_checkpoint_over_an_input_is_refused_and_deletes_nothing(
    capsys, inputs, tiny_next, monkeypatch, args, message, overwrite
):
    """The issue's layouts: --overwrite deleted the inputs; now each is refused first."""
    monkeypatch.chdir(inputs.parent)
    before = digests(inputs)
    code, err = run_before_ray(capsys, *args, "--model", str(tiny_next), *overwrite)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message.format(root=inputs) in err and "choose a directory apart from every input" in err
    assert digests(inputs) == before  # every input file still there, byte for byte


def test_symlinked_output_into_an_input_is_refused(capsys, inputs, tiny_next, tmp_path):
    (tmp_path / "link").symlink_to(inputs / "ow1")
    before = digests(inputs)
    code, err = run_before_ray(
        capsys,
        "--input",
        str(inputs / "ow1" / "part0.parquet"),
        "--output",
        str(tmp_path / "link"),
        "--model",
        str(tiny_next),
        "--overwrite",
    )
    assert code == 2 and "lies inside --output" in err
    assert digests(inputs) == before


@pytest.mark.parametrize(
    "out, ckpt, relation",
    [
        ("o", "o", "is the --output directory"),
        ("o", "o/ck", "lies inside --output"),
        ("o/res", "o", "holds --output"),
        ("s3://b/o/", "s3://b//o", "is the --output directory"),
        ("s3://b/o", "s3://b/o/ck/", "lies inside --output"),
    ],
)
def test_checkpoint_and_output_must_be_apart(capsys, tmp_path, tiny_next, monkeypatch, out, ckpt, relation):
    monkeypatch.chdir(tmp_path)
    write_input(tmp_path / "in.parquet", ["a", "b"])
    code, err = run_before_ray(
        capsys, "--input", "in.parquet", "--output", out, "--checkpoint", ckpt, "--model", str(tiny_next)
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--checkpoint {ckpt!r} {relation} {out!r}" in err and "separate directories" in err


@pytest.mark.parametrize("flag", ["--output", "--checkpoint"])
def test_a_location_nobody_can_write_is_refused_before_ray(capsys, tmp_path, tiny_next, flag):
    """A directory under a regular file can be created by no one (root included)."""
    write_input(tmp_path / "in.parquet", ["a", "b"])
    (tmp_path / "afile").write_text("x")
    places = {"--output": str(tmp_path / "out"), "--checkpoint": str(tmp_path / "ck")}
    places[flag] = str(tmp_path / "afile" / "sub")
    code, err = run_before_ray(
        capsys,
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        places["--output"],
        "--checkpoint",
        places["--checkpoint"],
        "--model",
        str(tiny_next),
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write to {flag} {places[flag]}: " in err and "Not a directory" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()  # the probe cleaned up after itself


def _can_mount():
    return os.geteuid() == 0 and subprocess.run(["mount", "--version"], capture_output=True).returncode == 0


@pytest.fixture()
def read_only_dir(tmp_path):
    """A read-only bind mount (root ignores chmod, so a mount is the only read-only place root meets)."""
    src, ro = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if not _can_mount() or subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)]).returncode:
        pytest.skip("needs root and mount for a read-only file system")
    yield ro
    subprocess.run(["umount", str(ro)], check=True)


def test_read_only_output_is_refused_before_ray(capsys, tmp_path, tiny_next, read_only_dir):
    write_input(tmp_path / "in.parquet", ["a", "b"])
    code, err = run_before_ray(
        capsys,
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(read_only_dir / "out"),
        "--model",
        str(tiny_next),
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write to --output {read_only_dir / 'out'}: " in err and "Read-only file system" in err


def test_overwrite_deletes_only_what_this_job_wrote(capsys, tmp_path, tiny_next, monkeypatch):
    """Foreign Parquet files in the output are refused under --overwrite (they would be
    read with the new rows), never deleted; the job's own files, record and checkpoint go."""
    write_input(tmp_path / "in.parquet", ["a", "b"])
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    ray_files(out, ckpt, 1, ["a"])
    (out / "_hired_batch_checkpoint.txt").write_text("/an/earlier/ck\n")
    pq.write_table(pa.table({"id": ["z"]}), out / "mine.parquet")
    argv = [
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--model",
        str(tiny_next),
        "--overwrite",
    ]
    before = digests(tmp_path)
    code, err = run_before_ray(capsys, *argv)
    assert code == 2 and "--overwrite deletes only files this job writes" in err and "mine.parquet" in err
    assert digests(tmp_path) == before
    (out / "mine.parquet").unlink()
    (out / "keep.txt").write_text("notes")  # not Parquet: neither read nor deleted

    from hired_batch.job import output, run

    # the checks and the clearing as ``run`` does them; no Ray, no job
    monkeypatch.setattr(run, "init_ray", lambda *a, **k: False)
    monkeypatch.setattr("hired_batch.job.pipeline.build_pipeline", lambda job: None)
    monkeypatch.setattr(output, "write_output", lambda ds, job: None)
    monkeypatch.setattr(run, "summarize", lambda job, *a: run.JobSummary(1, 1, 1, 0, 0, 0, 1.0, 0.0, 0.0, str(out)))
    assert main(["run", *argv]) == 0
    assert sorted(os.listdir(out)) == ["_hired_batch_checkpoint.txt", "keep.txt"] and os.listdir(ckpt) == []
    assert (out / "_hired_batch_checkpoint.txt").read_text().strip() == str(ckpt)  # this run's record, rewritten


def test_a_lost_second_file_of_a_write_task_is_caught(capsys, tmp_path, tiny_next):
    """With --rows-per-file a write task leaves STEM-0, STEM-1, ...: losing STEM-1 alone
    loses rows the checkpoint calls written, though STEM-0 still matches the stem."""
    write_input(tmp_path / "in.parquet", [f"r{i}" for i in range(6)])
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    ray_files(out, ckpt, 0, ["r0", "r1", "r2", "r3"], parts=2)
    ray_files(out, ckpt, 1, ["r4"], committed=False)  # pending: the resume redoes it, not lost
    argv = [
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--model",
        str(tiny_next),
    ]
    (out / f"{STEM}01-0.parquet").write_bytes(b"PAR1 cut short")  # a pending task's file is never read
    os.unlink(out / f"{STEM}00-1.parquet")
    code, err = run_before_ray(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "records 2 row(s) as written that no file in output" in err and "e.g. id 'r1'" in err


def test_an_unreadable_committed_output_file_is_named(capsys, tmp_path, tiny_next):
    write_input(tmp_path / "in.parquet", ["r0", "r1"])
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    stem = ray_files(out, ckpt, 0, ["r0"])
    (out / f"{stem}-0.parquet").write_bytes(b"PAR1 cut short")
    code, err = run_before_ray(
        capsys,
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--model",
        str(tiny_next),
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"output file {out / stem}-0.parquet cannot be read" in err


def test_a_failed_write_is_one_line_with_the_resume_command_and_leaves_no_unreadable_file(
    capsys, tmp_path, tiny_next, monkeypatch
):
    """Disk full inside Ray's write task, injected: the CLI prints one line naming the
    location and the resume command, exits 1, and removes the truncated file this run
    left (not its complete ones, not the earlier run's). Without --checkpoint the line
    says how to start over instead."""
    import ray.exceptions

    from hired_batch.job import output, run

    write_input(tmp_path / "in.parquet", ["r0", "r1", "r2"])
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    ray_files(out, ckpt, 0, ["r0"])  # an earlier run's
    earlier = digests(out)

    def disk_full(ds, job):
        ray_files(out, ckpt, 1, ["r1"])  # this run: one task done
        (out / f"{STEM}02-0.parquet").write_bytes(b"PAR1\x00\x00")  # one cut short (pending checkpoint)
        (ckpt / f"{STEM}02.pending.parquet").write_bytes(b"")
        cause = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        raise ray.exceptions.RayTaskError(
            "Write", "Traceback ...", cause, proctitle="ray::Write()"
        ).as_instanceof_cause()

    monkeypatch.setattr(run, "init_ray", lambda *a, **k: False)
    monkeypatch.setattr("hired_batch.job.pipeline.build_pipeline", lambda job: None)
    monkeypatch.setattr(output, "write_output", disk_full)
    argv = [
        "run",
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--model",
        str(tiny_next),
    ]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"writing to --output {out} (or its --checkpoint {ckpt}) failed: OSError: " in err
    assert "No space left on device; removed 1 unreadable file(s)" in err
    assert "; resume with: " in err and err.endswith(" ".join(argv)), err
    assert sorted(os.listdir(out)) == sorted([*earlier, f"{STEM}01-0.parquet", "_hired_batch_checkpoint.txt"])
    assert all(digests(out)[f] == d for f, d in earlier.items())
    pq.read_table(out)  # the directory reads again

    monkeypatch.setattr(
        output,
        "write_output",
        lambda ds, job: (_ for _ in ()).throw(
            ray.exceptions.RayTaskError(
                "Write", "Traceback ...", PermissionError(errno.EACCES, "Permission denied"), proctitle="ray::Write()"
            ).as_instanceof_cause()
        ),
    )
    argv = [*argv[:4], str(tmp_path / "out2"), "--model", str(tiny_next)]  # no --checkpoint: no resume
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"writing to --output {tmp_path / 'out2'} failed: PermissionError: " in err
    assert "this run had no --checkpoint, so it cannot be resumed: start again with" in err and "--overwrite" in err


@pytest.fixture()
def s3(monkeypatch):
    """(moto endpoint, boto3 client) with bucket ``vqa`` holding in/part{0,1,2}.parquet."""
    import io

    import boto3
    from support.s3_fault_proxy import FAKE_AWS, MotoS3

    for k, v in FAKE_AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with MotoS3() as url:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket="vqa")
        for k in range(3):
            buf = io.BytesIO()
            write_input(buf, [f"s{k}"])
            client.put_object(Bucket="vqa", Key=f"in/part{k}.parquet", Body=buf.getvalue())
        yield url, client


def s3_keys(client):
    return {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="vqa").get("Contents", [])}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--input", "s3://vqa/in/part0.parquet", "--output", "s3://vqa/in"],
            "input 's3://vqa/in/part0.parquet' lies inside --output",
        ),
        (
            ["--input", "s3://vqa/*/part1.parquet", "--output", "s3://vqa/in/"],
            "input file s3://vqa/in/part1.parquet lies inside --output",
        ),
        (
            ["--input", "s3://vqa/in/", "--output", "s3://vqa/o", "--checkpoint", "s3://vqa//in"],
            "--checkpoint 's3://vqa//in' is input",
        ),
        (
            ["--input", "s3://vqa/in", "--output", "s3://vqa/in/answers"],
            "--output 's3://vqa/in/answers' is inside input",
        ),
    ],
)
def test_s3_output_or_checkpoint_over_an_input_is_refused(capsys, s3, tiny_next, args, message):
    url, client = s3
    before = s3_keys(client)
    code, err = run_before_ray(capsys, *args, "--model", str(tiny_next), "--s3-endpoint", url, "--overwrite")
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert s3_keys(client) == before


def test_s3_location_the_job_cannot_write_is_refused_and_the_probe_leaves_nothing(capsys, s3, tiny_next):
    from hired_batch.job.options import job_from_options
    from hired_batch.job.output import check_writable

    url, client = s3
    code, err = run_before_ray(
        capsys,
        "--input",
        "s3://vqa/in/",
        "--output",
        "s3://no-such-bucket/out",
        "--model",
        str(tiny_next),
        "--s3-endpoint",
        url,
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot write to --output s3://no-such-bucket/out: " in err
    before = s3_keys(client)
    check_writable(
        job_from_options(
            {
                "input": ["s3://vqa/in/"],
                "output": "s3://vqa/out",
                "checkpoint": "s3://vqa/ck",
                "model": str(tiny_next),
                "s3_endpoint": url,
            }
        )
    )
    assert s3_keys(client) == before  # probes written and deleted again


@pytest.fixture()
def small_disk(tmp_path):
    """A 40 KiB tmpfs: room for a few of the job's output files, then ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root and mount for a small file system")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_disk_full_then_resume_writes_every_row_once(capsys, tmp_path, tiny_next, small_disk):
    """A real Ray job whose output disk fills midway: exit 1, one line naming the output
    and the resume command, every file left readable; after freeing space the printed
    command adds exactly the missing rows."""
    import shlex

    import ray
    from support.outputs import check_every_row_once

    ids = [f"r{i:03d}" for i in range(24)]
    write_input(tmp_path / "in.parquet", ids)
    out = small_disk / "out"
    argv = [
        "run",
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(out),
        "--checkpoint",
        str(tmp_path / "ck"),
        "--model",
        str(tiny_next),
        "--max-new-tokens",
        "2",
        "--batch-size",
        "4",
        "--rows-per-file",
        "2",
    ]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            err.startswith(
                f"error: writing to --output {out} (or its --checkpoint {tmp_path / 'ck'}) failed: OSError: [Errno 28]"
            )
            and "No space left on device" in err
        ), err
        for f in out.glob("*.parquet"):
            pq.read_metadata(f)  # nothing cut short stays behind
        subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
        resume = shlex.split(err.split("; resume with: ", 1)[1])
        assert "; removed " in err and resume[resume.index("run") :] == argv
        assert main(argv) == 0
    finally:
        ray.shutdown()
    check_every_row_once(pq.read_table(out), ids)
