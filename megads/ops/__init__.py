"""MoE routing and token-dispatch ops: native kernels (csrc/) with a pure-torch reference.

`MEGADS_OPS=torch|native` forces a path; by default the native library is used when it loads,
and the torch reference otherwise (logged once). `backend()` says which one is active.
"""
from __future__ import annotations

import logging
import os

import torch

from megads.ops import reference
from megads.ops.grouped import grouped_linear, grouped_swiglu
from megads.ops.reference import PermuteState, sequence_balance_loss, router_scores

log = logging.getLogger(__name__)

_native = None
_backend: str | None = None


def _select() -> str:
    global _native, _backend
    if _backend is not None:
        return _backend
    want = os.environ.get("MEGADS_OPS", "auto").strip().lower()
    if want not in ("auto", "torch", "native"):
        raise ValueError(f"MEGADS_OPS must be 'torch', 'native' or unset, got {want!r}")
    if want == "torch":
        _backend = "torch"
        return _backend
    try:
        from megads.ops import native as _n  # builds/loads the C++/CUDA extension

        _n.load()
        _native = _n
        _backend = "native"
    except Exception as e:  # missing or broken native library: fall back, say so once
        if want == "native":
            raise RuntimeError(f"MEGADS_OPS=native but the native ops failed to load: {e}") from e
        log.warning("megads native ops unavailable (%s); using the torch reference path", e)
        _backend = "torch"
    return _backend


def set_backend(name: str) -> str:
    """Force 'torch' or 'native' in this process (tests, benchmarks); returns the previous one."""
    global _backend, _native
    prev = _select()
    if name == "torch":
        _backend = "torch"
    elif name == "native":
        from megads.ops import native as _n

        _n.load()
        _native, _backend = _n, "native"
    else:
        raise ValueError(f"backend must be 'torch' or 'native', got {name!r}")
    return prev


def backend() -> str:
    """'native' or 'torch': the implementation route/permute/unpermute dispatch to."""
    return _select()


def _impl():
    return _native if _select() == "native" else reference


def route(logits, bias, *, top_k, n_group=1, topk_group=1, score_func="sigmoid", route_scale=1.0,
          norm_topk_prob=True):
    """Router: scores, biased group-limited top-k, unbiased normalised weights, counts.

    logits [T, E], bias [E] or None -> (weights [T, k] float32, indices [T, k] int64, counts [E]).
    """
    return _impl().route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                         score_func=score_func, route_scale=route_scale, norm_topk_prob=norm_topk_prob)


def permute(x, indices, num_experts):
    """x [T, H], indices [T, k] -> (x_sorted [T*k, H], offsets [E+1], state)."""
    return _impl().permute(x, indices, num_experts)


def unpermute(y_sorted, weights, state):
    """y_sorted [T*k, H], weights [T, k], state -> y [T, H] (weighted sum over each token's experts)."""
    return _impl().unpermute(y_sorted, weights, state)


__all__ = ["backend", "set_backend", "route", "permute", "unpermute", "grouped_linear", "grouped_swiglu", "PermuteState",
           "sequence_balance_loss", "router_scores", "reference"]
