#!/usr/bin/env bash
# One-GPU check (under 12 minutes): build the CUDA flavour of megads._C, run tests/ops on the GPU
# (and CPU), time the ops against the torch path on the GPU, check the CUDA-graph decode step,
# measure training MFU of the ~1B-active gpu-1b preset against the card's measured peak
# (bench/gpu_mfu.py, compiled blocks) and run the parallel == single-process equivalence test on
# NCCL with one rank per GPU.
#
#   bash bench/gpu_check.sh            # uses .venv/bin/python if present, else python
#   PY=/path/to/python bash bench/gpu_check.sh
# Needs torch with CUDA and nvcc (CUDA_HOME or PATH). TORCH_CUDA_ARCH_LIST defaults to the GPU's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}"
start=$SECONDS
step() { echo; echo "== $* ($((SECONDS - start)) s)"; }

step "device"
nvidia-smi -L
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
bash csrc/check_cuda.sh

step "build megads._C with CUDA kernels"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  export TORCH_CUDA_ARCH_LIST
fi
MEGADS_BUILD_CUDA=1 timeout 300 "$PY" -m pip install -e . --no-build-isolation --no-deps -q
"$PY" -c "from megads.ops import native; native.load(); assert native.has_kernels('cuda'), 'the CUDA build failed: see the pip output above'; print('CUDA kernels loaded')"

step "tests/ops on cuda and cpu"
timeout 180 "$PY" -m pytest -q -x tests/ops

step "benchmark on the GPU (torch path vs native)"
timeout 60 "$PY" bench/ops.py --device cuda
timeout 60 "$PY" bench/ops.py --device cuda --dtype bfloat16 --no-layer

step "fixed-shape decode: the CUDA-graph step against the plain step (tests/model/test_static_decode.py)"
timeout 120 "$PY" -m pytest -q -rs tests/model/test_static_decode.py

step "training MFU of the gpu-1b preset (compiled blocks, auto precision, native kernels) and CUDA-graph decode"
timeout 300 "$PY" bench/gpu_mfu.py

step "parallel == single process on NCCL, as many ranks as GPUs (tests/parallel/test_equivalence.py)"
NGPU=$(nvidia-smi -L | wc -l)
MEGADS_EQUIV_BACKEND=nccl MEGADS_EQUIV_MAX_WORLD="$NGPU" timeout 240 "$PY" -m pytest -q -rs tests/parallel/test_equivalence.py

step "done in $((SECONDS - start)) s"
