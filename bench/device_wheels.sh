#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a lent GPU machine, fetched here into .whl/ (ignored by
# git; name it in the device tool's `carry`). That machine reaches no package registry, and its
# image (Python 3.12, torch, transformers, pytest, ...: /work/.library/device/KINDS.md) lacks what
# megads's trainer and rewards import lazily: DeepSpeed and its pydantic/hjson, math-verify and its
# LaTeX parser. The versions are the ones this checkout's .venv runs, so both machines test the same
# code; binary wheels are taken for CPython 3.12 on manylinux x86_64, DeepSpeed is built here as a
# pure-Python wheel (its ops are JIT-built where needed, as in .venv).
#
#   bash bench/device_wheels.sh            # ~30 s; .whl/ holds ~3 MB
#   PYVER=3.12 PY=.venv/bin/python bash bench/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
PYVER="${PYVER:-3.12}"
OUTDIR="${OUTDIR:-.whl}"
mkdir -p "$OUTDIR"

version() {  # the version .venv runs, or empty
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

pins=()
for pkg in hjson pydantic pydantic_core annotated-types typing-inspection math-verify latex2sympy2_extended \
           antlr4-python3-runtime; do
  v="$(version "$pkg")"
  pins+=("$pkg${v:+==$v}")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp -d "$OUTDIR" "${pins[@]}"
ds="$(version deepspeed)"
if ! ls "$OUTDIR"/deepspeed-"${ds:-}"*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUTDIR" "deepspeed${ds:+==$ds}"
fi
ls -1 "$OUTDIR"/*.whl
du -sh "$OUTDIR"
