"""Real Ray nodes for tests: `ray start --block` processes on 127.0.0.1, token auth on.

A head (dashboard, Jobs API) and any number of worker nodes joined to it, each in its
own session with its own temp dir and free ports, so several clusters and nodes can
share one machine. Jobs go through ``ray job submit`` and the dashboard's HTTP API,
exactly as users reach a cluster.

Stopping only ever touches what was started here, by pid: the ``ray start`` process,
its descendants and the members of its session, with bounded waits and SIGKILL last.
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of the Python running pytest
START_TIMEOUT_S = 120  # a node on a loaded 2-core box can take a minute to come up
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, token: str | None, timeout: float = 10.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def tail(path, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<no log: {e}>"


# ----------------------------------------------------------------------------- processes


def our_processes(pid: int) -> list:
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


def alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_tree(proc: subprocess.Popen, procs: list) -> list:
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
        left = [p for p in procs if alive(p)]
        for p in left:
            try:
                sig_fn(p)
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(left, timeout=grace)
        if not left:
            break
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    return [p for p in procs if alive(p)]


# ----------------------------------------------------------------------------- nodes


def cluster_env(token: str, extra: dict | None = None) -> dict:
    """Environment for every node and client of one test cluster.

    Auth on explicitly (a bare `ray start --head` enables it only if a token file
    already exists); the token via env so ~/.ray/auth_token is neither read nor written.
    The job's `python` must be this interpreter (a venv need not be activated).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # On SIGTERM, `ray start --block` (2.60) first drains the node for up to
        # 30 s, waiting for leases a finished job's idle workers still hold.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        **(extra or {}),
    )
    return env


@dataclass
class RayNode:
    """One `ray start --block` process and its temp dir."""

    proc: subprocess.Popen
    temp_dir: str  # short: Ray puts unix sockets under it (the sun_path limit is 107 bytes)
    log_path: str
    gcs_address: str = ""  # head only: host:port the workers join
    _log: object = field(default=None, repr=False)

    def processes(self) -> list:
        return our_processes(self.proc.pid)

    def stop(self) -> list:
        """Stop the node and everything it started; the processes still alive (none)."""
        left = stop_tree(self.proc, self.processes())
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    def kill(self, timeout: float = 60) -> None:
        """Lose the node: SIGKILL its raylet, its workers and `ray start` at once, by pid,
        as a reclaimed spot instance or an OOM-killed raylet would; wait until all are gone."""
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(procs, timeout=timeout)
        self.proc.wait(timeout=timeout)
        assert not left, f"still alive after SIGKILL: {[(p.pid, p.name()) for p in left]}"


def start_node(
    env: dict,
    *,
    num_cpus: int,
    num_gpus: int,
    head_address: str | None = None,
    dashboard_port: int | None = None,
    object_store_bytes: int | None = None,
) -> RayNode:
    """`ray start --block` in its own session: a head when ``head_address`` is None
    (with the dashboard on ``dashboard_port``), else a worker joining that head.

    Returns at once; use ``wait_dashboard``/``wait_nodes`` to know it is up.
    """
    temp_dir = tempfile.mkdtemp(prefix="hbray", dir="/tmp")
    # Ports that otherwise default to fixed numbers another node or Ray may hold.
    ports = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    cmd = [
        *RAY,
        "start",
        "--block",
        "--disable-usage-stats",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        *ports,
    ]
    if object_store_bytes:  # several nodes on one machine share its /dev/shm
        cmd.append(f"--object-store-memory={object_store_bytes}")
    gcs = ""
    if head_address is None:
        gcs = f"127.0.0.1:{free_port()}"
        cmd += [
            "--head",
            f"--port={gcs.split(':')[1]}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port or free_port()}",
            f"--ray-client-server-port={free_port()}",
        ]
    else:
        cmd += [f"--address={head_address}"]
    log_path = os.path.join(temp_dir, "ray_start.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(proc=proc, temp_dir=temp_dir, log_path=log_path, gcs_address=gcs, _log=log)


def wait_dashboard(url: str, token: str, head: RayNode, timeout: float = START_TIMEOUT_S) -> None:
    """Poll the Jobs API's version endpoint until the head answers (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{tail(head.log_path)}")
        try:
            http_json(f"{url}/api/version", token)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dashboard not up after {timeout} s:\n{tail(head.log_path)}") from None
            time.sleep(0.5)


def alive_nodes(url: str, token: str) -> list[dict]:
    """Live nodes as the state API lists them (node_id, resources_total, is_head_node...)."""
    got = http_json(f"{url}/api/v0/nodes?limit=100&detail=1", token)
    return [n for n in got["data"]["result"]["result"] if n["state"] == "ALIVE"]


def wait_nodes(url: str, token: str, n: int, nodes: list[RayNode], timeout: float = START_TIMEOUT_S) -> list[dict]:
    """Poll until exactly ``n`` nodes are alive (bounded); fail early if a node's process died."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.proc.returncode}:\n{tail(node.log_path)}")
        try:
            live = alive_nodes(url, token)
            if len(live) == n:
                return live
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, json.JSONDecodeError):
            live = []
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(live)} live nodes after {timeout} s, expected {n}")
        time.sleep(0.5)


def new_token() -> str:
    return secrets.token_hex(32)


# ----------------------------------------------------------------------------- jobs


def ray_cli(env: dict, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def submit(url: str, env: dict, entry: list[str], prefix: str = "hb-test") -> str:
    """`ray job submit --no-wait` of ``entry`` from the repo root with
    cluster/runtime_env.yaml (its working_dir "." is the cwd), as docs/cluster.md tells
    users; returns the submission id."""
    sub_id = f"{prefix}-{secrets.token_hex(4)}"
    r = ray_cli(
        env,
        "job",
        "submit",
        "--address",
        url,
        "--submission-id",
        sub_id,
        "--no-wait",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        *entry,
    )
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
    return sub_id


def job_status(url: str, token: str, sub_id: str) -> str:
    try:
        return http_json(f"{url}/api/jobs/{sub_id}", token)["status"]
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return f"unknown ({e})"


def wait_job(url: str, env: dict, token: str, sub_id: str, timeout: float) -> str:
    """Poll the job's status until it ends; stop it if ``timeout`` runs out. The last status."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = job_status(url, token, sub_id)
        if status in TERMINAL:
            return status
        time.sleep(1.0)
    ray_cli(env, "job", "stop", "--address", url, sub_id, timeout=60)
    return f"{status} (stopped after {timeout} s)"


def job_logs(url: str, env: dict, sub_id: str, n: int = 6000) -> str:
    r = ray_cli(env, "job", "logs", "--address", url, sub_id, timeout=60)
    return (r.stdout + r.stderr)[-n:]
