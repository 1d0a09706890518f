"""Grouped matmul over expert-contiguous rows: one kernel for all experts where torch has it."""
from __future__ import annotations

import torch

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects expanded (stride-0) gradients
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e]^T for every expert e.

    x: [N, in] rows sorted by expert; weight: [E, out, in]; offsets: [E+1] row starts/ends.
    Uses torch._grouped_mm (fp32/bf16) when present; otherwise one matmul per non-empty segment
    with a single host read of the offsets.
    """
    E = weight.shape[0]
    if not x.is_cuda and 0 < x.shape[0] <= 64:
        # decode-sized batches on CPU: per-expert (W @ x^T)^T beats both grouped_mm and x @ W^T
        bounds = offsets.tolist()
        parts = [torch.mm(weight[e], x[bounds[e]:bounds[e + 1]].t()).t()
                 for e in range(E) if bounds[e + 1] > bounds[e]]
        return torch.cat(parts, 0)
    if _HAS_GROUPED_MM and x.dtype in (torch.float32, torch.bfloat16) and x.shape[0] > 0 and (
        x.dtype == torch.float32 or (x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0)
    ):
        ends = offsets[1:].to(torch.int32)
        y = torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=ends)
        return _contiguous_grad(y)
    bounds = offsets.tolist()
    parts = [x[bounds[e]:bounds[e + 1]] @ weight[e].t() for e in range(E) if bounds[e + 1] > bounds[e]]
    if not parts:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(parts, 0)
