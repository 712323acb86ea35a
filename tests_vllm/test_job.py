"""``hired-batch run --engine vllm`` on a real embedded Ray with the tiny checkpoint.

Each job runs in a child process (as a user runs it). Two jobs, each holding its
vLLM engines (1-2 min to start on two cores):

- budget 0.2: every row exactly once, bad rows as error rows, a generation actor
  SIGKILLed (with its engine processes) once the first output file is committed is
  restarted and its rows retried, and every answer equals our HF engine's;
- budget 1.0: the driver killed after the first committed checkpoint, the rerun adds
  only the missing rows, and every answer equals our HF engine's.

A third job runs a checkpoint vLLM's CPU attention cannot run: its engine dies at the
first row, once more after the restart, and the job ends with one line.

The good rows' images are URLs on a 127.0.0.1 server that holds the last ones back until
the test opens its gate (``support.gated_images``), so each kill lands mid-job however fast
the box is: an idle box once committed every row before the driver kill landed.
Four engine starts in all: 21 min measured on our 2 shared cores under load from other
jobs (563 s + 646 s), ~10 min at a load of 1-3.
"""

import os
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

SIZES = [(336, 336), (500, 300), (300, 700), (672, 336)]
LONG_QUESTION = "Describe " + "every single detail " * 300  # ~2400 tokens: beyond --max-model-len 2048


def write_input(path, n, images: GatedImages, n_open: int):
    """n good rows of mixed sizes whose images are URLs on ``images`` (rows from ``n_open``
    on wait for its gate, so a kill lands mid-job however fast the box is), plus rows the
    job must turn into error rows. Returns (rows, {uid: image bytes})."""
    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

    data = {f"u{i:03d}": image_to_bytes(make_synthetic_image(*SIZES[i % len(SIZES)], seed=i)) for i in range(n)}
    rows = [
        dict(uid=uid, image=images.add(f"{uid}.png", b, gated=i >= n_open), question=f"What is shape {i}?")
        for i, (uid, b) in enumerate(data.items())
    ]
    good = rows[0]["image"]
    rows += [
        dict(uid="bad-bytes", image=images.add("bad.png", b"not an image", gated=False), question="q"),
        dict(uid="empty-question", image=good, question="  "),
        dict(uid="too-long", image=good, question=LONG_QUESTION),
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows, data


def command(model, src, out, ckpt, budget):
    return [
        sys.executable,
        "-m",
        "hired_batch",
        "run",
        "--engine",
        "vllm",
        "--input",
        str(src),
        "--output",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--model",
        str(model),
        "--id-column",
        "uid",
        "--budget",
        str(budget),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--memory-limit",
        "256MB",
        "--max-model-len",
        "2048",
        "--rows-per-file",
        "2",
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
    ]


def start(cmd, log_path):
    """The job in its own process group, its output to a file."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=dict(os.environ, RAY_DEDUP_LOGS="0"),
        )


def family(pid) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_group(proc) -> None:
    """SIGKILL the driver, its process group and every descendant (raylet, actors, engines)."""
    kids = family(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_all(kids)
    proc.wait(timeout=60)


def generation_actors(root_pid) -> list:
    def cmd(p):
        try:
            return " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return ""

    return [p for p in family(root_pid) if "GenerateStage" in cmd(p)]


def hf_answers(model, rows, data, budget) -> dict:
    """Our HF engine's answers (float32, greedy, one item per call) for the good rows."""
    import io

    from conftest import hf_engine
    from PIL import Image

    from hired_batch.config import GenerationConfig

    engine = hf_engine(model, selector="hired", budget=budget)
    engine.generation = GenerationConfig(max_new_tokens=6)
    out = {}
    for r in rows:
        if r["uid"].startswith("u"):
            image = Image.open(io.BytesIO(data[r["uid"]])).convert("RGB")
            out[r["uid"]] = engine.generate([image], [r["question"]]).items[0]
    return out


def check_rows(table, rows, hf) -> None:
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(r["uid"] for r in rows), "every input row exactly once"
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["bad-bytes"]["error"].startswith("image:")
    assert by_id["empty-question"]["error"].startswith("question:")
    assert by_id["too-long"]["error"].startswith("question: prompt too long")
    for uid, item in hf.items():
        row = by_id[uid]
        assert row["error"] is None, row
        assert (row["answer"], row["n_generated_tokens"], row["n_visual_tokens_kept"], row["n_prompt_tokens"]) == (
            item["answer"],
            item["n_generated_tokens"],
            item["n_visual_tokens_kept"],
            item["n_prompt_tokens"],
        ), uid
        assert row["n_visual_tokens_full"] == item["n_visual_tokens_full"]
        assert row["t_prefill_s"] > 0 and row["t_decode_s"] >= 0 and row["t_batch_s"] >= row["t_prefill_s"]
        assert row["t_vision_s"] is None  # vLLM runs the tower inside its step: no per-request vision time


@pytest.fixture(autouse=True)
def no_ray_here():
    import ray

    ray.shutdown()


def test_killed_actor_is_restarted_rows_once_errors_and_answers_equal_hf(vllm_next, tmp_path):
    with GatedImages(tmp_path / "images") as images:
        rows, data = write_input(tmp_path / "in.parquet", 16, images, n_open=6)
        out, ckpt, log = tmp_path / "out", tmp_path / "ckpt", tmp_path / "job.log"
        proc = start(command(vllm_next, tmp_path / "in.parquet", out, ckpt, 0.2), log)
        try:
            assert wait_until(lambda: committed_checkpoint_ids(ckpt), proc, timeout=600), (
                "nothing committed before the job ended\n" + tail(log)
            )
            victims = generation_actors(proc.pid)
            assert victims, "no GenerateStage actor among the driver's processes"
            killed = victims[0].pid
            kill_all([*family(killed), victims[0]])  # the actor and its engine processes, mid-job
            images.open_gate()  # the held rows can go on: to a restarted actor
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    assert proc.returncode == 0, tail(log)
    table = pq.read_table(out)
    workers = set(table.column("worker").to_pylist())
    assert any(w.endswith(f":{killed}") for w in workers) and len(workers) >= 2, workers  # restarted, rows retried
    check_rows(table, rows, hf_answers(vllm_next, rows, data, 0.2))


def test_killed_driver_resumes_exactly_and_answers_equal_hf_at_budget_1(vllm_next, tmp_path):
    with GatedImages(tmp_path / "images") as images:
        rows, data = write_input(tmp_path / "in.parquet", 12, images, n_open=6)
        out, ckpt = tmp_path / "out", tmp_path / "ckpt"
        cmd = command(vllm_next, tmp_path / "in.parquet", out, ckpt, 1.0)
        first = start(cmd, tmp_path / "first.log")
        try:
            assert wait_until(lambda: committed_checkpoint_ids(ckpt), first, timeout=600), "nothing committed\n" + tail(
                tmp_path / "first.log"
            )
        finally:
            kill_group(first)
        committed = committed_checkpoint_ids(ckpt)
        assert 0 < len(committed) < len(rows), f"the kill came too late to test resuming ({len(committed)} rows)"
        images.open_gate()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"this run: {len(rows) - len(committed)} rows" in second.stdout
    # a good job's log reads as one: no engine failure at teardown, no deprecation, and only vLLM's
    # own two set_num_threads warnings at engine start (the plugin's were one per image)
    log = second.stdout + second.stderr
    for noise in ("output_handler failed", "RayDeprecationWarning"):
        assert noise not in log, noise
    assert log.count("torch.set_num_threads") <= 2, log.count("torch.set_num_threads")
    check_rows(pq.read_table(out), rows, hf_answers(vllm_next, rows, data, 1.0))


def test_an_engine_that_dies_of_the_same_error_twice_ends_the_job_with_one_line(tmp_path):
    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
    from hired_batch.engine.tiny import build_tiny_checkpoint

    # head size 16: vLLM's CPU attention dies at the first row. Preflight refuses it on CPU, so the
    # job declares a GPU (the engine still runs on CPU) to reach the restart rule behind that check
    model = build_tiny_checkpoint(tmp_path / "tiny16", "llava_next")
    img = image_to_bytes(make_synthetic_image(336, 336, seed=0))
    pq.write_table(
        pa.table({"uid": ["a", "b"], "image": [img, img], "question": ["What?", "Which?"]}), tmp_path / "in.parquet"
    )
    cmd = command(model, tmp_path / "in.parquet", tmp_path / "out", tmp_path / "ckpt", 0.2)
    cmd[cmd.index("--num-gpus") + 1] = "1"
    done = subprocess.run(
        cmd + ["--gpus-per-actor", "1"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, RAY_DEDUP_LOGS="0"),
    )
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: generation engine died twice in a row with the same error: EngineDeadError"), last
    assert "; resume with: " in last
    assert log.count("generation engine died (EngineDeadError") == 1  # one restart, then the job ended
