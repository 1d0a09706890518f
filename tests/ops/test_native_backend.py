"""Backend selection: MEGADS_OPS, the default, the logged fallback, and that the library is built."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megads import ops



def _native_error():
    try:
        from megads.ops import native

        native.load()
        return None
    except Exception as e:
        return e


NATIVE_ERROR = _native_error()

PROBE = """
import logging, sys, torch
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
if "--no-lib" in sys.argv:
    sys.modules["megads._C"] = None  # as if the native library were missing
from megads import ops
logits = torch.randn(8, 8)
for _ in range(2):
    w, idx, counts = ops.route(logits, None, top_k=2)
    xs, off, st = ops.permute(torch.randn(8, 4), idx, 8)
    ops.unpermute(xs, w, st)
print("BACKEND", ops.backend())
"""


def _probe(env_value: str | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MEGADS_OPS", None)
    if env_value is not None:
        env["MEGADS_OPS"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=300)


def _backend(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stderr
    return p.stdout.split("BACKEND")[-1].strip()


def test_native_library_is_built():
    """Where a C++ compiler exists, installing megads must have built the native library."""
    if NATIVE_ERROR is None:
        return
    if os.environ.get("MEGADS_BUILD_NATIVE", "1") == "0" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip(f"native ops not built here ({NATIVE_ERROR})")
    pytest.fail(f"megads._C failed to load ({NATIVE_ERROR}); rebuild: pip install -e . --no-build-isolation")


def test_cuda_kernels_are_built():
    if not torch.cuda.is_available() or NATIVE_ERROR is not None or os.environ.get("MEGADS_BUILD_CUDA") == "0":
        pytest.skip("no CUDA device (or no native library)")
    from megads.ops import native

    assert native.has_kernels("cuda"), "CUDA is available but megads._C has no CUDA kernels"


def test_env_selects_backend():
    assert _backend(_probe("torch")) == "torch"
    if NATIVE_ERROR is None:
        assert _backend(_probe(None)) == "native"  # the default when the library loads
        assert _backend(_probe("native")) == "native"


def test_missing_library_falls_back_and_logs_once():
    p = _probe(None, "--no-lib")
    assert _backend(p) == "torch"
    logged = [line for line in p.stderr.splitlines() if line.startswith("LOG ") and "native ops" in line]
    assert len(logged) == 1, p.stderr
    forced = _probe("native", "--no-lib")  # asked for native explicitly: an error, not a silent fallback
    assert forced.returncode != 0 and "MEGADS_OPS=native" in forced.stderr


def test_set_backend_switches_in_process(native):
    previous = ops.backend()
    try:
        assert ops.set_backend("torch") == previous and ops.backend() == "torch"
        ops.set_backend("native")
        assert ops.backend() == "native"
        _, _, state = ops.permute(torch.randn(4, 2), torch.tensor([[0], [1], [0], [1]]), 2)
        assert isinstance(state, native.NativePermuteState)
    finally:
        ops.set_backend(previous)
