#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc (compile only), so that a CUDA syntax error fails CI on
# machines without a GPU. The .cu files include no torch header, so any CUDA toolkit will do.
# Skips (exit 0) where nvcc is missing. CUDA_ARCH picks the target (default sm_90).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: nvcc not found; skipped compiling csrc/*.cu"
  exit 0
fi
arch="${CUDA_ARCH:-sm_90}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# the defines torch's CUDAExtension adds, so the check sees what the real build sees
flags=(-c -std=c++17 -O2 -arch="$arch" -Xcompiler -fPIC -Werror all-warnings
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
status=0
for src in "$here"/*.cu; do
  name="$(basename "$src")"
  if "$NVCC" "${flags[@]}" -I "$here" "$src" -o "$out/${name%.cu}.o"; then
    echo "check_cuda: ok   $name ($arch)"
  else
    echo "check_cuda: FAIL $name ($arch)"
    status=1
  fi
done
exit $status
