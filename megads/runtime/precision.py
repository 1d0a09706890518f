"""`precision: auto`: the matmul dtype this chip runs fastest, measured, never assumed.

Machines of one kind differ: a Xeon with AMX multiplies bf16 ~6x faster than fp32, an EPYC or a
Xeon without it ~10x slower; GPUs have bf16 tensor cores. `matmul_peaks` times one square matmul
in each dtype on the device at hand (best of up to five runs, after a warm-up); `resolve` turns
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
DECODE_FLOOR = 0.1  # generation times bf16 decode only where bf16 matmul is at least this share of fp32's
ENV = "MEGADS_PRECISION_AUTO"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, device: torch.device | str = "cpu", n_max: int | None = None,
                min_s: float = 0.02, reps: int = 5, budget_s: float = 0.5) -> float:
    """FLOP/s of a square matmul in `dtype`: each n from 256 up (doubling) is timed `reps` times
    (fewer once they have taken `budget_s`), best kept, until a product takes `min_s` or n reaches
    n_max; the last n's rate is the answer. The best of several runs, because one run on a shared
    machine can be slowed by half, which would make every MFU against it look twice as good.
    Bounded in time where a dtype is slow (bf16 without AMX runs at ~1 GFLOP/s on some CPUs: n
    stays at 256)."""
    device = torch.device(device)
    n_max = n_max or (8192 if device.type == "cuda" else 2048)
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up (and first-call set-up)
        best, spent = float("inf"), 0.0
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
            if spent >= budget_s:
                break
        if best >= min_s or n >= n_max:
            return 2 * n ** 3 / best
        n *= 2


def matmul_peaks(device: torch.device | str = "cpu", n_max: int | None = None) -> dict[str, float]:
    """{'fp32': FLOP/s, 'bf16': FLOP/s} measured now on `device`."""
    return {name: matmul_rate(dt, device, n_max) for name, dt in DTYPES.items()}


def choose(peaks: dict[str, float]) -> str:
    return "bf16" if peaks["bf16"] > BF16_MARGIN * peaks["fp32"] else "fp32"


def resolve(precision: str, device: torch.device | str = "cpu", group=None) -> tuple[str, dict[str, float]]:
    """(fp32 | bf16, measured peaks) for a configured `auto | fp32 | bf16`. Collective over
    `group` (default world) when torch.distributed is initialised: every rank must call it."""
    import torch.distributed as dist

    peaks = matmul_peaks(device)
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


@torch.no_grad()
def cast_params(model, dtype: torch.dtype):
    """`model` with its parameters in `dtype` and its float32 buffers (rope inverse frequencies,
    router biases) kept in float32, as DeepSpeed's mixed precision casts a module: a blanket
    `.to(bfloat16)` would round the inverse frequencies to 8 bits (rope angles off by radians at
    long positions) and the router biases to steps coarser than their update speed."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


@torch.no_grad()
def decode_step_rate(model, rows: int, steps: int = 3, prompt: int = 8) -> float:
    """Tokens/s of `model`'s own cached decode step at `rows` rows, in the dtype of its weights: a
    short random prompt, then the best of `steps` single-token steps. Every rank of a tensor- or
    expert-parallel model must call it together (its forwards hold collectives)."""
    from megads.model.cache import new_cache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (rows, prompt), generator=g).to(device)
    was = model.training
    model.eval()
    cache = new_cache(model.cfg, rows, prompt + steps + 1, dtype=dtype, device=device)
    model(x, cache=cache)
    best = float("inf")
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        model(x[:, -1:], cache=cache)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    model.train(was)
    return rows / best


def decode_rates(model, rows: int, steps: int = 3, prompt: int = 8) -> tuple[dict[str, float], dict]:
    """Tokens/s of `model`'s own decode step at `rows` rows in fp32 and in bf16, and the models:
    ({'fp32': .., 'bf16': ..}, {'fp32': model, 'bf16': a bf16 copy}). The whole step is timed,
    because proxies mislead: on an EPYC here a 4-row linear runs 4x faster in bf16 while the
    decode step (per-expert products of one row, attention over the cache) runs 2.6x slower."""
    import copy

    models = {"fp32": cast_params(model, torch.float32), "bf16": cast_params(copy.deepcopy(model), torch.bfloat16)}
    return {name: decode_step_rate(m, rows, steps, prompt) for name, m in models.items()}, models


def choose_decode(precision: str, peaks: dict[str, float], time_both=None, group=None) -> tuple[str, str]:
    """(fp32 | bf16, why) for decoding (generation, GRPO rollouts) under a configured
    `auto | fp32 | bf16`. auto: the pin if set; fp32 without timing where bf16 matmul is under
    DECODE_FLOOR of fp32's (`peaks`, measured); else `time_both()` -> {'fp32': tok/s, 'bf16':
    tok/s} of the real decode step, and the faster wins. In a multi-rank run rank 0's choice is
    broadcast over `group` (every rank calls this, and time_both, together)."""
    import torch.distributed as dist

    if precision != "auto":
        return precision, "configured"
    pinned = os.environ.get(ENV, "")
    if pinned:
        if pinned not in DTYPES:
            from megads.errors import ConfigError

            raise ConfigError(f"{ENV}: must be fp32 or bf16, got {pinned!r}")
        return pinned, f"pinned by {ENV}"
    if peaks["bf16"] < DECODE_FLOOR * peaks["fp32"]:
        return "fp32", (f"measured: bf16 matmul {peaks['bf16'] / 1e9:,.0f} GFLOP/s is under a tenth of "
                        f"fp32's {peaks['fp32'] / 1e9:,.0f}; decode not timed")
    rates = time_both()
    pick = torch.tensor([1 if rates["bf16"] > rates["fp32"] else 0])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.broadcast(pick, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    used = "bf16" if int(pick) else "fp32"
    return used, f"measured decode step: fp32 {rates['fp32']:,.0f}, bf16 {rates['bf16']:,.0f} tok/s"


def resolve_decode(precision: str, model, rows: int):
    """(fp32 | bf16, measured decode tokens/s or {}, the model in that dtype) for generation in
    one process: choose_decode, timing `model`'s decode step in both dtypes where auto has to."""
    measured = {}

    def time_both():
        rates, models = decode_rates(model, rows)
        measured.update(rates=rates, models=models)
        return rates

    auto = precision == "auto" and not os.environ.get(ENV)
    peaks = matmul_peaks(next(model.parameters()).device) if auto else {}
    used, _ = choose_decode(precision, peaks, time_both)
    if measured:
        return used, measured["rates"], measured["models"][used]
    return used, {}, cast_params(model, DTYPES[used])


def describe(configured: str, used: str, peaks: dict[str, float], threads: int | None = None) -> str:
    """The start-up log line: what precision runs and the two measured peaks behind it."""
    how = "measured" if configured == "auto" and not os.environ.get(ENV) else (
        f"pinned by {ENV}" if configured == "auto" else "configured")
    line = (f"precision {used} ({how}; matmul peaks fp32 {peaks['fp32'] / 1e9:,.0f}, "
            f"bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    return line + (f"; {threads} threads)" if threads else ")")
