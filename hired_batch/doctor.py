"""``hired-batch doctor``: can this Python run a job? One line per check.

Each check imports one library the job needs and says what it found, or the problem and
its fix in one line (known import failures are mapped to their fix by
``engine.environment.explain_import_error``; vLLM's by ``engine.vllm.vllm_problem``,
the same line ``run --engine vllm`` refuses with before Ray). The exit code is 0 when
everything the chosen engine needs is fine (``--engine``, default the job's), else 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from hired_batch.config import ENGINES, ModelConfig
from hired_batch.engine import vllm as plugin  # its attributes looked up per call (tests replace them)
from hired_batch.engine.environment import explain_import_error, torch_build

NOT_READY = 1  # the exit code when a check the engine needs failed


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str  # what was checked (a library, the GPU)
    ok: bool  # found as needed
    text: str  # what was found; or the problem and its fix
    needed_by: tuple[str, ...] = ENGINES  # engines that cannot run without it; () = information only


def requirement(dist: str, package: str):
    """The version specifier ``dist``'s installed metadata puts on ``package`` (its base
    requirement, not an extra's), or None when it states none or ``dist`` is not installed."""
    import importlib.metadata

    from packaging.requirements import Requirement

    try:
        reqs = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in reqs:
        req = Requirement(line)
        if req.name.lower() != package:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            return req.specifier
    return None


def _version_check(name: str, version: str, spec, who: str, needed_by=ENGINES, found: str = "") -> Check:
    """ok when ``version`` satisfies ``spec`` (what ``who`` requires); the fix names the pin."""
    shown = found or version
    if spec is None or spec.contains(version.split("+")[0], prereleases=True):
        return Check(name, True, f"{shown}" + (f"; {who} needs {spec}" if spec else ""), needed_by)
    return Check(name, False, f"{shown}, but {who} needs {spec}: pip install '{name}{spec}'", needed_by)


def check_torch() -> Check:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - reported as the line
        return Check("torch", False, f"does not import: {explain_import_error(e)}")
    return _version_check(
        "torch", torch.__version__, requirement("hired_batch", "torch"), "hired_batch", found=torch_build(torch)
    )


def check_torchvision() -> Check:
    """transformers' image processors import torchvision whenever it is installed, so a
    torchvision built for another torch breaks the hf engine too (and ``tiny-model``)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return Check("torchvision", True, "not installed (the hf engine runs without it; vLLM installs it)")
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001
        return Check("torchvision", False, f"does not import: {explain_import_error(e)}")
    return Check("torchvision", True, f"{torchvision.__version__} (loads on this torch)")


def check_transformers() -> list[Check]:
    """The version each engine needs, and the LLaVA classes the engines load."""
    try:
        import transformers
        from transformers import LlamaConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [Check("transformers", False, f"LLaVA classes do not import: {explain_import_error(e)}")]
    version = transformers.__version__
    checks = [
        _version_check(
            "transformers", version, requirement("hired_batch", "transformers"), "hired_batch", needed_by=("hf",)
        )
    ]
    vllm = plugin.installed_vllm()
    if vllm is not None:
        checks.append(
            _version_check("transformers", version, requirement(vllm[0], "transformers"), vllm[0], needed_by=("vllm",))
        )
    return checks


def check_ray() -> Check:
    try:
        import ray
    except Exception as e:  # noqa: BLE001
        return Check("ray", False, f"does not import: {explain_import_error(e)}")
    return _version_check("ray", ray.__version__, requirement("hired_batch", "ray"), "hired_batch")


def check_vllm() -> Check:
    problem = plugin.vllm_problem()
    if problem:
        return Check("vllm", False, f"--engine vllm {problem}", needed_by=("vllm",))
    dist, version = plugin.installed_vllm()
    return Check("vllm", True, f"{dist} {version} (imports; the HiRED plugin runs on it)", needed_by=("vllm",))


def check_gpu() -> Check:
    """GPUs torch sees; information only, except the CUDA build of vLLM without a GPU."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    except Exception as e:  # noqa: BLE001 - a broken CUDA setup is what this line reports
        return Check("gpu", False, f"torch cannot query CUDA: {explain_import_error(e)}", needed_by=())
    vllm = plugin.installed_vllm()
    if n == 0 and vllm is not None and vllm[0] == plugin.VLLM_DISTRIBUTIONS[0]:
        return Check(
            "gpu",
            False,
            f"none visible, and {vllm[0]} is vLLM's CUDA build: on a CPU machine install "
            f"'hired_batch[{plugin.VLLM_DISTRIBUTIONS[1]}]' instead",
            needed_by=("vllm",),
        )
    if n == 0:
        return Check(
            "gpu",
            True,
            "none visible: jobs run on CPU (fine for the tiny model; real checkpoints want a GPU)",
            needed_by=(),
        )
    return Check("gpu", True, f"{n} visible: {', '.join(names)}", needed_by=())


def run_checks() -> list[Check]:
    """Every check, in the order a broken install is best read (torch first)."""
    return [check_torch(), check_torchvision(), *check_transformers(), check_ray(), check_vllm(), check_gpu()]


def status(check: Check, engine: str) -> str:
    """``ok``; ``PROBLEM`` when ``engine`` needs what failed; ``note`` otherwise."""
    if check.ok:
        return "ok"
    return "PROBLEM" if engine in check.needed_by else "note"


def report(checks: list[Check], engine: str) -> tuple[list[str], bool]:
    """The lines to print and whether ``engine`` can run here."""
    lines = [f"{status(c, engine):<8} {c.name:<13} {c.text}" for c in checks]
    problems = sum(status(c, engine) == "PROBLEM" for c in checks)
    verdict = (
        f"ready for --engine {engine}"
        if not problems
        else f"not ready for --engine {engine}: {problems} problem(s) above"
    )
    return lines + [verdict], problems == 0


def doctor_main(args) -> int:
    """``hired-batch doctor``: print the report; 0 when ``--engine`` can run here."""
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    lines, ready = report(run_checks(), args.engine)
    print("\n".join(lines))
    return 0 if ready else NOT_READY


def add_parser(sub) -> None:
    """Register ``hired-batch doctor``."""
    p = sub.add_parser(
        "doctor",
        help="check this Python's torch, transformers, Ray, vLLM and GPUs",
        description="One line per check: ok, or the problem and its fix. Exit 0 when the "
        "engine can run here, 1 otherwise.",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=ModelConfig.engine,
        help=f"the engine that must be able to run (default {ModelConfig.engine})",
    )
    p.set_defaults(func=doctor_main)
