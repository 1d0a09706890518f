"""`precision: auto`: the matmul dtype this chip runs fastest, measured, never assumed.

Machines of one kind differ: a Xeon with AMX multiplies bf16 ~6x faster than fp32, an EPYC or a
Xeon without it ~10x slower; GPUs have bf16 tensor cores. `matmul_peaks` times one square matmul
in each dtype on the device at hand (best of a few runs, after a warm-up); `resolve` turns
`auto` into `bf16` where bf16's rate beats fp32's by `BF16_MARGIN` (mixed precision pays for
casts and fp32 master copies, so a near tie stays fp32), else `fp32`.

In a multi-rank run every rank measures (under the same thread count and load as its training)
and rank 0's figures are broadcast, so all ranks decide alike and log the same peaks.
`MEGADS_PRECISION_AUTO=fp32|bf16` pins what `auto` resolves to without measuring (reproducible
test and CI runs on machines that differ); the peaks are still measured where MFU needs them.
"""
from __future__ import annotations

import os
import time

import torch

BF16_MARGIN = 1.25
ENV = "MEGADS_PRECISION_AUTO"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, device: torch.device | str = "cpu", n_max: int | None = None,
                min_s: float = 0.02, reps: int = 3) -> float:
    """FLOP/s of a square matmul in `dtype`: n doubles from 256 until one product takes `min_s`
    (or n reaches n_max), then the best of `reps` at that n. Bounded in time where a dtype is slow
    (bf16 without AMX runs at ~1 GFLOP/s on some CPUs: n stays at 256)."""
    device = torch.device(device)
    n_max = n_max or (8192 if device.type == "cuda" else 2048)
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up (and first-call set-up)
        best = float("inf")
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t)
            if best >= min_s and n > 256:
                break
        if best >= min_s or n >= n_max:
            return 2 * n ** 3 / best
        n *= 2


def matmul_peaks(device: torch.device | str = "cpu", n_max: int | None = None) -> dict[str, float]:
    """{'fp32': FLOP/s, 'bf16': FLOP/s} measured now on `device`."""
    return {name: matmul_rate(dt, device, n_max) for name, dt in DTYPES.items()}


def skinny_rates(rows: int, k: int, n: int, device: torch.device | str = "cpu",
                 min_s: float = 0.05) -> dict[str, float]:
    """{'fp32': FLOP/s, 'bf16': FLOP/s} of x [rows, k] @ w [k, n]: the shape of a decode step
    (a few rows against every weight, bound by memory rather than by the matmul units; on some
    CPUs bf16 wins here by halving the bytes while losing the square matmul). Each dtype is
    repeated for about `min_s` and the best of three such rounds is kept."""
    device = torch.device(device)
    out = {}
    for name, dt in DTYPES.items():
        x = torch.randn(rows, k, device=device).to(dt)
        w = torch.randn(n, k, device=device).to(dt)  # nn.Linear's layout: y = x @ w.T
        torch.nn.functional.linear(x, w)
        _sync(device)
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _sync(device)
        best = time.perf_counter() - t
        reps = int(min_s / max(best, 1e-7))
        for _ in range(3 if reps else 0):  # a slow dtype keeps its one timing
            t = time.perf_counter()
            for _ in range(min(reps, 200)):
                torch.nn.functional.linear(x, w)
            _sync(device)
            best = min(best, (time.perf_counter() - t) / min(reps, 200))
        out[name] = 2 * rows * k * n / best
    return out


def choose(peaks: dict[str, float]) -> str:
    return "bf16" if peaks["bf16"] > BF16_MARGIN * peaks["fp32"] else "fp32"


def resolve(precision: str, device: torch.device | str = "cpu", group=None,
            decode: tuple[int, int, int] | None = None) -> tuple[str, dict[str, float]]:
    """(fp32 | bf16, measured peaks) for a configured `auto | fp32 | bf16`. Collective over
    `group` (default world) when torch.distributed is initialised: every rank must call it.
    decode (rows, k, n): choose for generation, by the rates of that skinny product instead of
    the square matmul peaks (skinny_rates)."""
    import torch.distributed as dist

    peaks = skinny_rates(*decode, device=device) if decode else matmul_peaks(device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        t = torch.tensor([peaks["fp32"], peaks["bf16"]], dtype=torch.float64,
                         device=device if torch.device(device).type == "cuda" else "cpu")
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        peaks = {"fp32": float(t[0]), "bf16": float(t[1])}
    if precision != "auto":
        return precision, peaks
    pinned = os.environ.get(ENV, "")
    if pinned:
        if pinned not in DTYPES:
            from megads.errors import ConfigError

            raise ConfigError(f"{ENV}: must be fp32 or bf16, got {pinned!r}")
        return pinned, peaks
    return choose(peaks), peaks


def describe(configured: str, used: str, peaks: dict[str, float], threads: int | None = None) -> str:
    """The start-up log line: what precision runs and the two measured peaks behind it."""
    how = "measured" if configured == "auto" and not os.environ.get(ENV) else (
        f"pinned by {ENV}" if configured == "auto" else "configured")
    line = (f"precision {used} ({how}; matmul peaks fp32 {peaks['fp32'] / 1e9:,.0f}, "
            f"bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    return line + (f"; {threads} threads)" if threads else ")")
