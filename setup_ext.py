"""Native extension build for setup.py: `megads._C` from csrc/ (the MoE routing/dispatch ops).

- The C++ (CPU) kernels are built whenever torch is importable at build time (the Makefile
  installs with --no-build-isolation for that reason).
- The CUDA kernels are added where torch has CUDA (`torch.version.cuda`) and nvcc is found.
- Building never fails the install: if the CUDA build fails the CPU-only library is built, and
  if that fails too megads installs without it and runs on the torch reference path
  (megads.ops logs that once).

Environment: MEGADS_BUILD_NATIVE=0 skips the native library; MEGADS_BUILD_CUDA=0|1 forces the
CUDA part off/on (default: auto). TORCH_CUDA_ARCH_LIST and MAX_JOBS work as in torch.
"""
from __future__ import annotations

import os
import shutil
import sys

CPU_SOURCES = ["csrc/registration.cpp", "csrc/cpu_ops.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cpp", "csrc/route.cu", "csrc/dispatch.cu"]
EXT_NAME = "megads._C"


def _say(msg: str) -> None:
    print(f"megads: {msg}", file=sys.stderr)


def _cuda_wanted(torch, cuda_home) -> bool:
    flag = os.environ.get("MEGADS_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    have = bool(torch.version.cuda) and cuda_home is not None and (
        os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) or shutil.which("nvcc") is not None)
    if flag in ("1", "true", "yes", "on") and not have:
        _say("MEGADS_BUILD_CUDA=1 but torch has no CUDA or nvcc is missing; building the CPU ops only")
    return have


def ext_modules_and_cmdclass():
    """([Extension], {"build_ext": ...}) for setup(); ([], {}) when nothing can be built."""
    if os.environ.get("MEGADS_BUILD_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _say("MEGADS_BUILD_NATIVE=0: installing without the native ops")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # torch missing at build time (e.g. build isolation): torch path only
        _say(f"torch is not importable at build time ({e}); installing without the native ops")
        return [], {}

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for is OpenMP in torch's builds
    cxx = ["-O3", *openmp]
    cpu_ext = CppExtension(EXT_NAME, CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    ext = cpu_ext
    if _cuda_wanted(torch, CUDA_HOME):
        nvcc = ["-O3", "-lineinfo"]
        ext = CUDAExtension(EXT_NAME, CPU_SOURCES + CUDA_SOURCES, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=openmp)
        ext._megads_fallback = cpu_ext  # built instead if the CUDA build fails

    class BuildNative(BuildExtension):
        """BuildExtension that falls back to CPU only, then to no native library, never failing."""

        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
                err = e
            fallback = getattr(self.extensions[0], "_megads_fallback", None) if self.extensions else None
            if fallback is not None:
                _say(f"building the CUDA ops failed ({err}); building the CPU ops only")
                for key, value in vars(self.extensions[0]).items():  # setuptools' per-extension state
                    if key.startswith("_") and not key.startswith("_megads") and not hasattr(fallback, key):
                        setattr(fallback, key, value)
                self.ext_map[fallback._full_name] = fallback
                self.extensions = [fallback]
                try:
                    super().build_extensions()
                    return
                except Exception as e:  # noqa: BLE001
                    err = e
            _say(f"building the native ops failed ({err}); megads will use the torch reference path")
            self.extensions = []  # nothing to copy or install

    # the ninja pip package puts its binary next to the interpreter, which may not be on PATH
    bindir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return [ext], {"build_ext": BuildNative}
