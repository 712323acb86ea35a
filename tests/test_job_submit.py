"""End to end through ``ray job submit``: a real head node, token auth on, working dir uploaded.

Starts ``ray start --head --block`` on 127.0.0.1 (free ports, a short --temp-dir, one
logical GPU), submits ``python jobs/batch_qa.py`` from the repo root with
cluster/runtime_env.yaml (its working_dir) exactly as docs/cluster.md tells users to, waits for the job
(bounded), and checks the Parquet it wrote. Uses no embedded ``ray.init``.

Cleanup stops only what this module started, by pid (tests/support/ray_nodes.py): the
``ray start`` process, its descendants and the members of its session, with bounded
waits and SIGKILL last; never ``ray stop``, which kills every Ray process on the machine.
"""

from __future__ import annotations

import sys
import time
import urllib.error

import pytest
from support.ray_nodes import (
    TERMINAL,
    cluster_env,
    free_port,
    http_json,
    job_logs,
    job_status,
    new_token,
    ray_cli,
    start_node,
    submit,
    wait_dashboard,
    wait_job,
)

pytestmark = pytest.mark.slow

N_ROWS = 8
JOB_TIMEOUT_S = 300

# The documented output schema (docs/guarantees.md): column -> Arrow type name.
OUTPUT_TYPES = {
    "id": "string",
    "answer": "string",
    "error": "string",
    "model": "string",
    "selector": "string",
    "mode": "string",
    "budget": "double",
    "n_visual_tokens_full": "int64",
    "n_visual_tokens_kept": "int64",
    "n_prompt_tokens": "int64",
    "n_generated_tokens": "int64",
    "batch_id": "string",
    "batch_size": "int64",
    "t_preprocess_s": "double",
    "t_vision_s": "double",
    "t_prefill_s": "double",
    "t_decode_s": "double",
    "t_batch_s": "double",
    "worker": "string",
    "handoff_bytes": "int64",
}


@pytest.fixture(scope="module", autouse=True)
def _no_embedded_ray():
    """Another module's embedded Ray in this process must not be mistaken for ours."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    yield


@pytest.fixture(scope="module")
def ray_head():
    """A head node with token auth on and one logical GPU; yields (dashboard URL, env for clients, token)."""
    token = new_token()
    # `ray job stop` waits RAY_JOB_STOP_WAIT_TIME_S (default 3 s) before SIGKILL; a loaded
    # test machine may need longer for the stopped driver to print its resume line
    env = cluster_env(token, {"RAY_JOB_STOP_WAIT_TIME_S": "60"})
    dash_port = free_port()
    head = start_node(env, num_cpus=2, num_gpus=1, dashboard_port=dash_port)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        wait_dashboard(url, token, head)
        yield url, env, token
    finally:
        left = head.stop()
        assert not left, f"processes left behind by ray start: {[(p.pid, p.name()) for p in left]}"


# ----------------------------------------------------------------------------- test


def test_auth_is_on(ray_head):
    """No token, no API: the cluster under test is the secured kind users should run."""
    url, _, _ = ray_head
    with pytest.raises(urllib.error.HTTPError) as e:
        http_json(f"{url}/api/jobs/", None)
    assert e.value.code == 401


def test_job_submit_writes_every_row(ray_head, tiny_next, tmp_path):
    import pyarrow.dataset as pads

    from hired_batch.demo import write_demo_parquet

    url, env, token = ray_head
    data = write_demo_parquet(str(tmp_path / "input" / "demo.parquet"), N_ROWS)
    out = tmp_path / "output"
    entry = [
        "python",
        "jobs/batch_qa.py",
        "--input",
        data,
        "--output",
        str(out),
        "--model",
        str(tiny_next),
        "--budget",
        "0.2",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
    ]

    # 1) submit: uploads the repo (runtime_env excludes .git/.venv/caches) and returns
    t0 = time.monotonic()
    sub_id = submit(url, env, entry)
    # 2) wait, bounded
    status = wait_job(url, env, token, sub_id, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", (
        f"job {sub_id} ended {status} after {time.monotonic() - t0:.0f} s:\n{job_logs(url, env, sub_id)}"
    )

    # 3) the output: every input id once, the documented columns and types, no errors
    table = pads.dataset(str(out), format="parquet").to_table()
    ids = table["id"].to_pylist()
    assert sorted(ids) == [f"demo-{i:04d}" for i in range(N_ROWS)], f"ids {ids}\n{job_logs(url, env, sub_id)}"
    types = {f.name: str(f.type) for f in table.schema}
    assert types == OUTPUT_TYPES
    errors = [e for e in table["error"].to_pylist() if e is not None]
    assert not errors, errors
    assert set(table["selector"].to_pylist()) == {"hired"}
    assert all(
        k <= f for k, f in zip(table["n_visual_tokens_kept"].to_pylist(), table["n_visual_tokens_full"].to_pylist())
    )


def test_ray_job_stop_prints_the_resume_command_and_the_resume_is_exact(ray_head, tiny_next, tmp_path):
    """`ray job stop` SIGTERMs the entrypoint mid-job (the last rows' images are held back
    until the test opens the gate) and SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S (3 s) later: the
    job's log ends with the command that resumes it, and submitting that command completes
    the job, every row exactly once."""
    import shlex

    import pyarrow as pa
    import pyarrow.parquet as pq
    from support.gated_images import GatedImages
    from support.outputs import check_every_row_once, committed_checkpoint_ids

    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

    url, env, token = ray_head
    out, ckpt = tmp_path / "output", tmp_path / "ckpt"
    with GatedImages(tmp_path / "images") as images:
        rows = [
            dict(
                uid=f"u{i}",
                question=f"What is shape {i}?",
                image=images.add(f"{i}.png", image_to_bytes(make_synthetic_image(336, 336, seed=i)), gated=i >= 4),
            )
            for i in range(N_ROWS)
        ]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
        entry = [
            "python",
            "jobs/batch_qa.py",
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(out),
            "--checkpoint",
            str(ckpt),
            "--model",
            str(tiny_next),
            "--id-column",
            "uid",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "2",
            "--image-timeout",
            "600",
        ]
        sub_id = submit(url, env, entry)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (
            not committed_checkpoint_ids(ckpt)
            and job_status(url, token, sub_id) not in TERMINAL
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert committed_checkpoint_ids(ckpt), f"nothing committed:\n{job_logs(url, env, sub_id)}"
        stop = ray_cli(env, "job", "stop", "--address", url, sub_id, timeout=180)
        status = wait_job(url, env, token, sub_id, 120)
        logs = job_logs(url, env, sub_id)
        assert stop.returncode == 0 and status == "STOPPED", f"{stop.stdout}{stop.stderr}\n{status}\n{logs}"
        assert "Traceback" not in logs and "SIGTERM received" not in logs, logs
        line = [ln for ln in logs.splitlines() if ln.startswith("interrupted; ")]
        assert line and line[-1].startswith("interrupted; resume with: python jobs/batch_qa.py "), logs
        resume = shlex.split(line[-1].split("resume with: ", 1)[1])
        assert resume == entry
        images.open_gate()
        again = submit(url, env, resume)
        status = wait_job(url, env, token, again, JOB_TIMEOUT_S)
        assert status == "SUCCEEDED", job_logs(url, env, again)
    check_every_row_once(pq.read_table(out), [r["uid"] for r in rows])
