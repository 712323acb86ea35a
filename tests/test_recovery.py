"""Nothing lost: a killed GPU actor and a killed driver, each on a real embedded Ray
in a child process, end with every input row exactly once in the output.

The kill lands mid-job by construction: the last rows' images come from a local HTTP
server that holds them back (``support.gated_images``), so the job cannot finish before
the test has seen rows written or committed, killed it and opened the gate."""

import os
import shlex
import signal
import subprocess
import sys

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.gated_images import GatedImages
from support.outputs import committed_checkpoint_ids
from support.processes import tail, wait_until

from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()  # the child processes start their own embedded Ray


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ROWS, N_OPEN = 12, 6  # rows in the input; the first N_OPEN are served at once, the rest once the gate opens


def write_input(path, images: GatedImages, n=N_ROWS, n_open=N_OPEN):
    """n rows whose images are URLs on ``images``; rows from ``n_open`` on wait for its gate."""
    sizes = [(336, 336), (500, 300), (300, 700)]
    rows = [
        dict(
            uid=f"u{i:03d}",
            question=f"What is shape {i}?",
            image=images.add(
                f"{i:03d}.png", image_to_bytes(make_synthetic_image(*sizes[i % 3], seed=i)), gated=i >= n_open
            ),
        )
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return [r["uid"] for r in rows]


def command(model, src, out, *extra):
    return [
        sys.executable,
        "-m",
        "hired_batch",
        "run",
        "--input",
        str(src),
        "--output",
        str(out),
        "--model",
        str(model),
        "--id-column",
        "uid",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--num-cpus",
        "2",
        "--num-gpus",
        "1",
        "--image-timeout",
        "600",
        *extra,
    ]  # held images wait, not fail


def start(cmd, log_path):
    """The job in its own process group, its output to a file (a pipe nobody reads
    would fill up and stall the driver)."""
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def wait_for_files(out, n_files, proc):
    return wait_until(
        lambda: os.path.isdir(out) and len([f for f in os.listdir(out) if f.endswith(".parquet")]) >= n_files, proc
    )


def kill_group(proc):
    """SIGKILL the driver, its process group and every descendant (raylet, workers)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


def output_ids(out):
    t = pq.read_table(out)
    return t.column("id").to_pylist(), t


def generate_workers(root_pid):
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k for k in kids if "GenerateStage" in " ".join(_cmd(k))]


def _cmd(p):
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_killed_generate_actor_is_restarted_and_nothing_is_lost(tiny_next, tmp_path):
    with GatedImages(tmp_path / "images") as images:
        ids = write_input(tmp_path / "in.parquet", images)
        out = tmp_path / "out"
        log_path = tmp_path / "job.log"
        proc = start(command(tiny_next, tmp_path / "in.parquet", out), log_path)
        try:
            assert wait_for_files(out, 1, proc), tail(log_path)
            victims = generate_workers(proc.pid)
            assert victims, "no GenerateStage worker found among the driver's processes"
            victims[0].kill()  # SIGKILL mid-job: the gated rows are not generated yet
            killed_pid = victims[0].pid
            images.open_gate()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    assert proc.returncode == 0, tail(log_path)
    got, table = output_ids(out)
    assert sorted(got) == sorted(ids)  # every row exactly once
    workers = set(table.column("worker").to_pylist())
    assert any(w.endswith(f":{killed_pid}") for w in workers) and len(workers) >= 2, workers


def readable_files(out):
    """{file name: table} for the output files a reader can open (a file cut mid-write cannot be)."""
    tables = {}
    for f in sorted(os.listdir(out)):
        try:
            tables[f] = pq.read_table(os.path.join(out, f))
        except Exception:  # noqa: BLE001 - a torn file from the killed run
            pass
    return tables


def test_killed_driver_resumes_from_checkpoint(tiny_next, tmp_path):
    with GatedImages(tmp_path / "images") as images:
        _killed_driver_resumes(tiny_next, tmp_path, images)


def _killed_driver_resumes(tiny_next, tmp_path, images):
    ids = write_input(tmp_path / "in.parquet", images)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    first = start(command(tiny_next, tmp_path / "in.parquet", out, "--checkpoint", str(ckpt)), tmp_path / "first.log")
    try:
        assert wait_until(lambda: committed_checkpoint_ids(ckpt), first), tail(tmp_path / "first.log")
    finally:
        kill_group(first)  # the driver and its embedded Ray die mid-run (the gated rows are not done)
    images.open_gate()
    # Ray commits a file's rows after writing it: rows of files written but not committed when the
    # driver died are uncommitted, and the resume deletes those files and redoes their rows.
    committed = committed_checkpoint_ids(ckpt)
    before = readable_files(out)
    seen = {i: w for t in before.values() for i, w in zip(t.column("id").to_pylist(), t.column("worker").to_pylist())}
    assert 0 < len(committed) <= N_OPEN, f"{len(committed)} rows committed: the gate let rows through"
    assert set(committed) <= set(seen)
    second = subprocess.run(
        command(tiny_next, tmp_path / "in.parquet", out, "--checkpoint", str(ckpt)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"this run: {len(ids) - len(committed)} rows" in second.stdout  # only the uncommitted rows
    got, table = output_ids(out)
    assert sorted(got) == sorted(ids)  # every row exactly once after the resume
    # the committed rows of the first run are untouched; every other row was made by the second run
    final_workers = dict(zip(got, table.column("worker").to_pylist()))
    assert {i: final_workers[i] for i in committed} == {i: seen[i] for i in committed}
    first_workers = {seen[i] for i in committed}
    assert {final_workers[i] for i in ids if i not in set(committed)}.isdisjoint(first_workers)
    third = subprocess.run(
        command(tiny_next, tmp_path / "in.parquet", out, "--checkpoint", str(ckpt)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "this run: 0 rows" in third.stdout
    assert sorted(output_ids(out)[0]) == sorted(ids)  # a finished job's rerun adds nothing


# (signal, how it is sent, entrypoint words, exit code). SIGINT: a terminal's Ctrl-C, to the
# whole foreground group, through the CLI. SIGTERM: what `ray job stop` (and Kubernetes, and
# schedulers) send, to the driver itself, through the `ray job submit` entrypoint.
STOPS = {
    "ctrl-c": (signal.SIGINT, "group", ["-m", "hired_batch", "run"], 130),
    "sigterm": (signal.SIGTERM, "driver", [os.path.join(REPO, "jobs", "batch_qa.py")], 143),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_stopped_job_prints_the_resume_command_and_the_resume_is_exact(tiny_next, tmp_path, stop):
    with GatedImages(tmp_path / "images") as images:
        _stop_then_resume(tiny_next, tmp_path, images, *STOPS[stop])


def _stop_then_resume(tiny_next, tmp_path, images, sig, target, entry, code):
    ids = write_input(tmp_path / "in.parquet", images)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    cmd = [sys.executable, *entry] + command(tiny_next, tmp_path / "in.parquet", out, "--checkpoint", str(ckpt))[4:]
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    with open(tmp_path / "first.out", "w") as so, open(tmp_path / "first.err", "w") as se:
        first = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, start_new_session=True, env=env)
    try:
        assert wait_until(lambda: committed_checkpoint_ids(ckpt), first), (tmp_path / "first.err").read_text()[-3000:]
        if target == "group":
            os.killpg(first.pid, sig)
        else:
            os.kill(first.pid, sig)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            kill_group(first)
    images.open_gate()
    err = (tmp_path / "first.err").read_text()
    assert first.returncode == code, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "SIGTERM" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    words = ["python", *entry]
    assert last.startswith(f"interrupted; resume with: {shlex.join(words)} "), last
    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[: len(words)] == words and resume[len(words) :] == cmd[1 + len(entry) :]
    # a rerun that forgets --checkpoint is told which checkpoint resumes this output
    forgot = subprocess.run(
        command(tiny_next, tmp_path / "in.parquet", out), capture_output=True, text=True, timeout=120
    )
    assert forgot.returncode == 2 and f"add --checkpoint {ckpt} to resume it" in forgot.stderr, forgot.stderr
    second = subprocess.run([sys.executable] + resume[1:], capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    got, _ = output_ids(out)
    assert sorted(got) == sorted(ids)  # every row exactly once after the resume


def test_interrupt_message_without_checkpoint_says_how_to_start_again():
    from hired_batch.job.runner import interrupted_message

    words = ["hired-batch", "run", "--input", "in/", "--output", "out dir"]
    line = interrupted_message({"input": ["in/"], "output": "out dir"}, words)
    assert line.startswith("interrupted; this run had no --checkpoint, so it cannot be resumed")
    assert "hired-batch run --input in/ --output 'out dir' --overwrite" in line and "--checkpoint DIR" in line
    # --overwrite from a --config file: the resume must not start over
    line = interrupted_message({"checkpoint": "ck", "overwrite": True}, ["hired-batch", "run", "--config", "j.yaml"])
    assert line == "interrupted; resume with: hired-batch run --config j.yaml --no-overwrite"
    line = interrupted_message({"checkpoint": "ck", "overwrite": True}, ["hired-batch", "run", "--overwrite"])
    assert line == "interrupted; resume with: hired-batch run --no-overwrite"
