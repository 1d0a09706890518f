#!/usr/bin/env bash
# One-GPU check, in named steps: build the CUDA flavour of megads._C, run tests/ops on the GPU (and
# CPU), time the ops against the torch path on the GPU, check the CUDA-graph decode step, measure
# training MFU of the ~1B-active gpu-1b preset against the card's measured peak (bench/gpu_mfu.py,
# compiled blocks) and run the parallel == single-process equivalence test on NCCL with one rank
# per GPU.
#
#   bash bench/gpu_check.sh                  # every step that fits the budget, in order
#   bash bench/gpu_check.sh mfu nccl         # these steps only (after a first call on a warm machine)
#   bash bench/gpu_check.sh --dry-run        # the plan: steps, their time limits, what would run
#
# Made for the device tool's lent machine: one command may run 10 minutes, the whole lease 15, and
# the machine reaches no package registry. So:
# - GPU_CHECK_BUDGET (seconds, default 540): a step starts only if the time spent so far plus its
#   own limit fits; the steps that did not are printed with the command that runs them (a second
#   call on the still-warm machine, whose build is kept);
# - the build step is skipped when megads._C already has its CUDA kernels;
# - wheels in .whl/ (bench/device_wheels.sh makes them here; carry .whl) are installed first,
#   without an index, for what the machine's image lacks (DeepSpeed, math-verify);
# - with $OUT set, everything printed also goes to $OUT/gpu_check.log, so a cut-off run still
#   brings back what it did.
# Python: PY, else .venv/bin/python, else python3 (the lent image's), else python. Needs torch with
# CUDA and nvcc (CUDA_HOME or PATH). TORCH_CUDA_ARCH_LIST defaults to the GPU's.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
  elif command -v python3 >/dev/null; then PY=python3
  else PY=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import megads from the checkout too
BUDGET="${GPU_CHECK_BUDGET:-540}"
ALL=(device wheels build ops-tests ops-bench static mfu nccl)
declare -A LIMIT=([device]=30 [wheels]=60 [build]=240 [ops-tests]=150 [ops-bench]=90 [static]=90 [mfu]=240
                  [nccl]=180)
declare -A WHAT=([device]="the GPU, torch and the .cu files compiled alone (csrc/check_cuda.sh)"
                 [wheels]="packages the image lacks, from .whl/ (no index)"
                 [build]="megads._C with its CUDA kernels"
                 [ops-tests]="tests/ops on cuda and cpu"
                 [ops-bench]="benchmark on the GPU: the torch path vs native, fp32 and bf16 (bench/ops.py)"
                 [static]="fixed-shape decode: the CUDA-graph step against the plain step (tests/model/test_static_decode.py)"
                 [mfu]="training MFU of the gpu-1b preset (compiled blocks, auto precision, native kernels) and CUDA-graph decode (bench/gpu_mfu.py)"
                 [nccl]="parallel == single process on NCCL, as many ranks as GPUs (tests/parallel/test_equivalence.py)")

dry=0
steps=()
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    all) steps+=("${ALL[@]}") ;;
    *) if [[ -z "${LIMIT[$a]:-}" ]]; then echo "gpu_check: unknown step '$a' (steps: ${ALL[*]})" >&2; exit 2; fi
       steps+=("$a") ;;
  esac
done
[[ ${#steps[@]} -eq 0 ]] && steps=("${ALL[@]}")

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  tee_pid=$!
fi

run_step() {
  local lim="${LIMIT[$1]}"
  case "$1" in
    device)
      nvidia-smi -L &&
      timeout "$lim" "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" &&
      timeout "$lim" bash csrc/check_cuda.sh ;;
    wheels)
      if compgen -G ".whl/*.whl" >/dev/null; then
        timeout "$lim" "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
      else
        echo "no .whl/: nothing to install (DeepSpeed and math-verify must be there already)"
      fi &&
      "$PY" -c "import deepspeed, math_verify; print('deepspeed', deepspeed.__version__, 'math_verify ok')" ;;
    build)
      if "$PY" -c "from megads.ops import native; native.load(); raise SystemExit(0 if native.has_kernels('cuda') else 1)" 2>/dev/null; then
        echo "megads._C already has its CUDA kernels: not rebuilt"
        return 0
      fi
      if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
        TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
        export TORCH_CUDA_ARCH_LIST
      fi
      MEGADS_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" timeout "$lim" "$PY" -m pip install -e . --no-build-isolation --no-deps -q &&
      "$PY" -c "from megads.ops import native; native.load(); assert native.has_kernels('cuda'), 'the CUDA build failed: see the pip output above'; print('CUDA kernels loaded')" ;;
    ops-tests)
      timeout "$lim" "$PY" -m pytest -q -x -p no:cacheprovider tests/ops ;;
    ops-bench)
      timeout $((lim / 2)) "$PY" bench/ops.py --device cuda &&
      timeout $((lim / 2)) "$PY" bench/ops.py --device cuda --dtype bfloat16 --no-layer ;;
    static)
      timeout "$lim" "$PY" -m pytest -q -rs -p no:cacheprovider tests/model/test_static_decode.py ;;
    mfu)
      timeout "$lim" "$PY" bench/gpu_mfu.py ;;
    nccl)
      local ngpu
      ngpu=$(nvidia-smi -L | wc -l)
      MEGADS_EQUIV_BACKEND=nccl MEGADS_EQUIV_MAX_WORLD="$ngpu" timeout "$lim" "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/parallel/test_equivalence.py ;;
  esac
}

start=$SECONDS
sim=0  # a dry run's clock: each step as if it took its whole limit
left=()
failed=()
echo "gpu_check: steps ${steps[*]}; budget ${BUDGET} s; python $PY"
for s in "${steps[@]}"; do
  if (( dry )); then spent=$sim; else spent=$((SECONDS - start)); fi
  if (( spent + LIMIT[$s] > BUDGET )); then
    left+=("$s")
    continue
  fi
  echo
  echo "== $s: ${WHAT[$s]} (limit ${LIMIT[$s]} s; ${spent} s spent)"
  if (( dry )); then
    echo "(dry run)"
    sim=$((sim + LIMIT[$s]))
    continue
  fi
  if run_step "$s"; then
    echo "== $s: ok ($((SECONDS - start - spent)) s)"
  else
    echo "== $s: FAILED ($((SECONDS - start - spent)) s)"
    failed+=("$s")
  fi
done
echo
echo "gpu_check: done in $((SECONDS - start)) s; failed: ${failed[*]:-none}"
if (( ${#left[@]} )); then
  echo "gpu_check: not run (would pass the ${BUDGET} s budget): ${left[*]}"
  echo "gpu_check: run them with: bash bench/gpu_check.sh ${left[*]}"
fi
status=$(( ${#failed[@]} > 0 ))
if [[ -n "${tee_pid:-}" ]]; then  # let tee write everything to the log before the script ends
  exec >&- 2>&-
  wait "$tee_pid"
fi
exit "$status"
