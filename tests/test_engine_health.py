"""Bounded engine restarts: the failure log's rules, and through the CLI a generation
engine that always fails at start (the job ends with one line and the resume command)
and one that fails once (the job finishes, every row exactly once)."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.fake_engines import ALWAYS, STARTS_ENV

from hired_batch.engine.hf_backend import ENGINE_FACTORY_ENV
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.job.engine_health import EngineFailed, FailureLog, engine_failure

TESTS = Path(__file__).parent


def test_the_log_says_when_a_failure_repeats_and_forgets_it_after_a_success():
    log = FailureLog()
    assert log.begin("a/start") == (1, None)
    assert not log.failed("a/start", "RuntimeError: busy")
    assert log.begin("a/start") == (2, "RuntimeError: busy")
    assert not log.failed("a/start", "OSError: other")  # a different error: not deterministic
    assert log.failed("a/start", "OSError: other")  # the same error twice in a row
    assert not log.failed("b/start", "OSError: other")  # another actor keeps its own record
    log.ok("a/start")
    assert log.begin("a/start") == (1, None) and not log.failed("a/start", "OSError: other")


def test_engine_failure_is_found_in_rays_wrappers_and_their_text():
    assert engine_failure(ValueError("x")) is None
    inner = EngineFailed("generation engine failed to start twice with the same error: E: x")
    try:
        try:
            raise inner
        except EngineFailed as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as wrapped:
        assert str(engine_failure(wrapped)) == str(inner)
    # an actor's constructor error reaches the driver as text only (ActorDiedError)
    text = (
        "The actor died because of an error raised in its creation task\nTraceback ...\n"
        "hired_batch.job.engine_health.EngineFailed: generation engine failed to start twice with the "
        "same error: RuntimeError: boom\n"
    )
    assert str(engine_failure(RuntimeError(text))).endswith("same error: RuntimeError: boom")


def write_input(path) -> list[str]:
    qs = ["What is it?", "Where is <image> here?", "Which colour?", "How many?"]
    rows = [
        dict(uid=f"u{i}", question=q, image=image_to_bytes(make_synthetic_image(336, 336, seed=i)))
        for i, q in enumerate(qs)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return [r["uid"] for r in rows]


def run_cli(tiny_next, tmp_path, factory, *extra):
    """``hired-batch run`` in a child process with the fake engine ``factory`` in its actors."""
    starts = tmp_path / "starts.txt"
    cmd = [
        sys.executable,
        "-m",
        "hired_batch",
        "run",
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_next),
        "--id-column",
        "uid",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--num-cpus",
        "2",
        *extra,
    ]
    paths = [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        RAY_DEDUP_LOGS="0",
        **{ENGINE_FACTORY_ENV: f"support.fake_engines:{factory}", STARTS_ENV: str(starts)},
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    n_starts = len(starts.read_text().splitlines()) if starts.exists() else 0
    return done, cmd, n_starts


@pytest.mark.slow
def test_an_engine_that_always_fails_at_start_ends_the_job_with_one_line(tiny_next, tmp_path):
    write_input(tmp_path / "in.parquet")
    done, cmd, n_starts = run_cli(tiny_next, tmp_path, "always_fails", "--checkpoint", str(tmp_path / "ckpt"))
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: generation engine failed to start twice with the same error: RuntimeError: {ALWAYS}; "
        f"resume with: python -m hired_batch {' '.join(cmd[3:])}"
    ), last
    assert n_starts == 2  # one restart, then the job ends (no endless restarts)


@pytest.mark.slow
def test_an_engine_that_fails_once_at_start_is_restarted_and_the_job_finishes(tiny_next, tmp_path):
    ids = write_input(tmp_path / "in.parquet")
    done, _, n_starts = run_cli(tiny_next, tmp_path, "fails_once")
    assert done.returncode == 0, done.stderr[-3000:]
    assert n_starts == 2
    t = pq.read_table(tmp_path / "out")
    rows = {r["id"]: r for r in t.to_pylist()}
    assert sorted(rows) == sorted(ids) and t.num_rows == len(ids)  # every row exactly once
    # a question holding the image token is its row's error; the other rows are answered
    assert rows["u1"]["error"].startswith("question: holds the image token '<image>'") and rows["u1"]["answer"] is None
    assert all(rows[i]["error"] is None and rows[i]["answer"] is not None for i in ("u0", "u2", "u3"))
