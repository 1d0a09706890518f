"""Where a rank runs: its device, and on CPU how many threads it uses.

Threads: `train.threads` when set; else a user's `OMP_NUM_THREADS` (torch already follows it) or,
for a single process, whatever torch has now (its default, or the user's own
`torch.set_num_threads`); only when several ranks share a node without either does megads split
the cores between them (cores / LOCAL_WORLD_SIZE), so they do not oversubscribe.

Memory on CPU: torch's CPU tensors come from the C library's malloc, and glibc gives large freed
blocks back to the kernel (munmap, or trimming the heap's top), so the next step's tensors of the
same sizes fault their pages in again (~60,000 page faults per training step of the small preset,
~0.2 s of system time on 2 cores). `keep_freed_memory` makes glibc keep what it frees (mmap only
above 32 MiB, no trimming): the process keeps its peak footprint, as a caching allocator would.
MEGADS_MALLOC=system leaves malloc as it is; a user's own MALLOC_*_ / GLIBC_TUNABLES settings or a
preloaded jemalloc/tcmalloc are left alone too.
"""
from __future__ import annotations

import ctypes
import os
import platform

import torch

MALLOC_ENV = "MEGADS_MALLOC"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit


def place(threads: int = 0) -> tuple[torch.device, int]:
    """(this rank's device, the torch threads it uses)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.get_num_threads()
    keep_freed_memory()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS") and local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu"), torch.get_num_threads()


_malloc_state: str | None = None


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring), once per
    process. Returns what holds, for the log: "kept", or why malloc is left as it is."""
    global _malloc_state
    if _malloc_state is not None:
        return _malloc_state
    want = os.environ.get(MALLOC_ENV, "keep").strip().lower() or "keep"
    if want not in ("keep", "system"):
        from megads.errors import ConfigError

        raise ConfigError(f"{MALLOC_ENV}: must be keep or system, got {want!r}")
    own = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        own.append("GLIBC_TUNABLES")
    preload = os.environ.get("LD_PRELOAD", "")
    if want == "system":
        _malloc_state = f"system ({MALLOC_ENV}=system)"
    elif own:
        _malloc_state = f"system (set by {', '.join(own)})"
    elif "jemalloc" in preload or "tcmalloc" in preload:
        _malloc_state = "system (a preloaded allocator)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _malloc_state = "system (not glibc)"
    else:
        mallopt = ctypes.CDLL(None).mallopt
        ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
              and mallopt(_M_TOP_PAD, 64 << 20) == 1)
        _malloc_state = "kept" if ok else "system (mallopt refused)"
    return _malloc_state


def add_malloc_argument(parser) -> None:
    """A benchmark's --malloc flag (see bench_malloc)."""
    parser.add_argument("--malloc", choices=("keep", "system"), default="keep",
                        help="glibc's freed memory kept for reuse, as megads train sets it on CPU (keep, its "
                             "default), or glibc's own trimming (system); process-wide: every side runs with it")


def bench_malloc(mode: str) -> str:
    """For a benchmark process (before it allocates much): malloc as `megads train` sets it on CPU
    (mode "keep", its default) or glibc's own ("system"). Process-wide, so every side of a
    comparison in the process runs with it. Returns the log line."""
    os.environ[MALLOC_ENV] = mode
    return describe_malloc()


def describe_malloc() -> str:
    state = keep_freed_memory()
    return ("CPU memory: glibc keeps freed blocks for reuse (mmap above 32 MiB only, no trimming; "
            f"{MALLOC_ENV}=system to turn off)" if state == "kept" else f"CPU memory: malloc {state}")


def compile_note(blocks: int) -> str:
    """The one log line after the first compiled step: torch.compile's own account of the time it
    spent (dynamo's per-frame timings; a private table, so it may be absent in another torch)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics

        secs = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        spent = f"{secs:.1f} s compiling (dynamo + inductor, first step)"
    except ImportError:
        spent = "compile time not reported by this torch"
    return f"torch.compile: {blocks} blocks compiled, {spent}"
