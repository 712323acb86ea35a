"""End to end through ``ray job submit``: a real head node, token auth on, working dir uploaded.

Starts ``ray start --head --block`` on 127.0.0.1 (free ports, a short --temp-dir, one
logical GPU), submits ``python jobs/batch_qa.py`` from the repo root with
cluster/runtime_env.yaml (its working_dir) exactly as docs/cluster.md tells users to, waits for the job
(bounded), and checks the Parquet it wrote. Uses no embedded ``ray.init``.

Cleanup stops only what this module started, by pid: the ``ray start`` process, its
descendants and the members of its session, with bounded waits and SIGKILL last.
``ray stop`` (even ``--force``) is never called: it kills every Ray process on the
machine by name, including other test sessions' clusters.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of the Python running pytest
N_ROWS = 8
JOB_TIMEOUT_S = 300
START_TIMEOUT_S = 90

# The documented output schema (README): column -> Arrow type name.
OUTPUT_TYPES = {
    "id": "string", "answer": "string", "error": "string", "model": "string",
    "selector": "string", "mode": "string", "budget": "double",
    "n_visual_tokens_full": "int64", "n_visual_tokens_kept": "int64",
    "n_prompt_tokens": "int64", "n_generated_tokens": "int64",
    "batch_id": "string", "batch_size": "int64", "t_preprocess_s": "double",
    "t_vision_s": "double", "t_prefill_s": "double", "t_decode_s": "double",
    "t_batch_s": "double", "worker": "string",
}


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _http_json(url: str, token: str | None, timeout: float = 5.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _our_processes(pid: int) -> list:
    """`pid` and everything it started: its descendants, plus any member of the session
    it leads (start_new_session=True), which catches children re-parented to init."""
    import psutil

    found = {}
    try:
        root = psutil.Process(pid)
        found = {p.pid: p for p in [root] + root.children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid not in found and os.getsid(p.pid) == pid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return list(found.values())


def _stop_tree(proc: subprocess.Popen, procs: list) -> list:
    """SIGTERM `ray start --block` (it stops its own children), then whatever is left.

    ``procs`` is a snapshot taken before any signal. Every wait is bounded; returns
    the processes still alive at the end (should be none).
    """
    import psutil

    # 1) ray start --block handles SIGTERM by shutting its node down
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # 2) raylet/workers can outlive it for seconds: terminate, then kill, by pid
    for sig_fn, grace in ((psutil.Process.terminate, 10), (psutil.Process.kill, 10)):
        alive = [p for p in procs if _alive(p)]
        for p in alive:
            try:
                sig_fn(p)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace)
        if not alive:
            break
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    return [p for p in procs if _alive(p)]


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ----------------------------------------------------------------------------- fixtures


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
    """A head node with token auth on; yields (dashboard URL, env for clients, token)."""
    token = secrets.token_hex(32)
    # Short: Ray puts unix sockets under it (the sun_path limit is 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="hbray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Auth on explicitly (a bare `ray start --head` enables it only if a token file
    # already exists); the token via env so ~/.ray/auth_token is neither read nor written.
    # The job's `python` must be this interpreter (a venv need not be activated).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               # On SIGTERM, `ray start --block` (2.60) first drains the node for up to
               # 30 s, waiting for leases a finished job's idle workers still hold.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    dash_port = _free_port()
    cmd = [*RAY, "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=true",
           "--num-cpus=2", "--num-gpus=1", f"--temp-dir={temp_dir}",
           f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           # ports that otherwise default to fixed numbers another Ray may hold
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log.name)}")
            try:
                _http_json(f"{url}/api/version", token)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dashboard not up after {START_TIMEOUT_S} s:\n{_tail(log.name)}")
                time.sleep(0.5)
        yield url, env, token
    finally:
        left = _stop_tree(proc, _our_processes(proc.pid))
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes left behind by ray start: {[(p.pid, p.name()) for p in left]}"


def _tail(path: str, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<no log: {e}>"


# ----------------------------------------------------------------------------- test


def test_auth_is_on(ray_head):
    """No token, no API: the cluster under test is the secured kind users should run."""
    url, _, _ = ray_head
    with pytest.raises(urllib.error.HTTPError) as e:
        _http_json(f"{url}/api/jobs/", None)
    assert e.value.code == 401


def test_job_submit_writes_every_row(ray_head, tiny_next, tmp_path):
    import pyarrow.dataset as pads

    from hired_batch.demo import write_demo_parquet

    url, env, token = ray_head
    data = write_demo_parquet(str(tmp_path / "input" / "demo.parquet"), N_ROWS)
    out = tmp_path / "output"
    sub_id = f"hb-test-{secrets.token_hex(4)}"
    entry = ["python", "jobs/batch_qa.py", "--input", data, "--output", str(out), "--model", str(tiny_next),
             "--budget", "0.2", "--max-new-tokens", "4", "--batch-size", "4"]

    def ray_cli(*args, timeout=120):
        return subprocess.run([*RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def job_logs() -> str:
        r = ray_cli("job", "logs", "--address", url, sub_id, timeout=60)
        return (r.stdout + r.stderr)[-6000:]

    # 1) submit: uploads the repo (runtime_env excludes .git/.venv/caches) and returns
    t0 = time.monotonic()
    r = ray_cli("job", "submit", "--address", url, "--submission-id", sub_id, "--no-wait",
                "--runtime-env", "cluster/runtime_env.yaml", "--", *entry)  # working_dir "." = cwd REPO
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"

    # 2) wait, bounded
    status = None
    while time.monotonic() - t0 < JOB_TIMEOUT_S:
        try:
            status = _http_json(f"{url}/api/jobs/{sub_id}", token)["status"]
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            status = f"unknown ({e})"
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1.0)
    else:
        ray_cli("job", "stop", "--address", url, sub_id, timeout=60)
    assert status == "SUCCEEDED", f"job {sub_id} ended {status} after {time.monotonic() - t0:.0f} s:\n{job_logs()}"

    # 3) the output: every input id once, the documented columns and types, no errors
    table = pads.dataset(str(out), format="parquet").to_table()
    ids = table["id"].to_pylist()
    assert sorted(ids) == [f"demo-{i:04d}" for i in range(N_ROWS)], f"ids {ids}\n{job_logs()}"
    types = {f.name: str(f.type) for f in table.schema}
    assert types == OUTPUT_TYPES
    errors = [e for e in table["error"].to_pylist() if e is not None]
    assert not errors, errors
    assert set(table["selector"].to_pylist()) == {"hired"}
    assert all(k <= f for k, f in zip(table["n_visual_tokens_kept"].to_pylist(),
                                       table["n_visual_tokens_full"].to_pylist()))
