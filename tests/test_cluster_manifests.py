"""The cluster manifests parse, agree with each other, and name only real flags.

A typo in a YAML flag or a drifted runtime_env would otherwise surface as a failed
job on a GPU cluster; here it costs a unit test.
"""

import argparse
import copy
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCS = REPO / "docs" / "cluster.md"
ENTRY_SCRIPT = "jobs/batch_qa.py"


def _load_one(name):
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one YAML document, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def rayjob():
    return _load_one("rayjob.yaml")


@pytest.fixture(scope="module")
def entrypoint(rayjob):
    return rayjob["spec"]["entrypoint"].strip()


@pytest.mark.parametrize("name", ["runtime_env.yaml", "rayjob.yaml", "aws-gpu.yaml"])
def test_manifest_parses(name):
    assert isinstance(_load_one(name), dict)


def test_rayjob_required_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"  # keep Ray's token auth on
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        (c,) = g["template"]["spec"]["containers"]
        assert str(g["rayStartParams"]["num-gpus"]) == str(c["resources"]["limits"]["nvidia.com/gpu"])


def test_rayjob_aws_credentials_come_from_a_secret(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in pods:
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[key]["valueFrom"], f"{c['name']}: {key} must come from a Secret"
                assert "value" not in env[key]


def test_runtime_env_yaml_matches_shared_file(rayjob):
    inline = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    shared = _load_one("runtime_env.yaml")
    assert inline == shared
    assert shared["working_dir"] == "."
    assert {".git", ".venv"} <= set(shared["excludes"])
    secretish = [k for k in shared.get("env_vars", {}) if k.endswith("_TOKEN") or "SECRET" in k or "ACCESS_KEY" in k]
    assert not secretish, f"secrets do not belong in a runtime_env (ray job list shows it): {secretish}"


def test_entrypoint_names_only_real_flags(entrypoint):
    from hired_batch.job import runner

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", ENTRY_SCRIPT]
    # allow_abbrev=False: a prefix like --budg must not pass for --budget
    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    runner.add_run_arguments(p)
    args, unknown = p.parse_known_args(argv[2:])
    assert not unknown, f"entrypoint flags unknown to hired-batch run: {unknown}"
    # the values validate too (no Ray, no model download)
    from hired_batch.job import job_from_options

    job = job_from_options(runner.job_options(runner.merged_options(args)))
    assert job.resources.min_actors == job.resources.max_actors == 2
    assert job.resources.gpus_per_actor == 1.0


def test_docs_and_launcher_use_the_same_entrypoint(entrypoint):
    docs = DOCS.read_text()
    assert entrypoint in docs, "docs/cluster.md must show the RayJob's exact entrypoint"
    assert "--runtime-env cluster/runtime_env.yaml --" in docs and "RAY_AUTH_MODE=token" in docs
    # runtime_env.yaml sets working_dir: a --working-dir as well overrides it, with a warning from Ray
    for doc in (docs, (REPO / "README.md").read_text()):
        submits = [line for line in doc.splitlines() if "ray job submit" in line and "--runtime-env" in line]
        assert submits and not [line for line in submits if "--working-dir" in line]
    launcher = (CLUSTER / "aws-gpu.yaml").read_text()
    assert entrypoint in launcher  # the header comment's submit command
    assert ENTRY_SCRIPT in docs.split("## Ray cluster launcher")[1]


def test_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load_one("aws-gpu.yaml")
    assert cfg["provider"]["type"] == "aws"
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's own schema: no unknown keys
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU") == 1 for t in workers)
    assert any("pip install -e" in c for c in cfg["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"])
