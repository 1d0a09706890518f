"""Where a rank runs: its device, and on CPU how many threads it uses.

Threads: `train.threads` when set; else a user's `OMP_NUM_THREADS` (torch already follows it) or,
for a single process, whatever torch has now (its default, or the user's own
`torch.set_num_threads`); only when several ranks share a node without either does megads split
the cores between them (cores / LOCAL_WORLD_SIZE), so they do not oversubscribe.
"""
from __future__ import annotations

import os

import torch


def place(threads: int = 0) -> tuple[torch.device, int]:
    """(this rank's device, the torch threads it uses)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS") and local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu"), torch.get_num_threads()


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
