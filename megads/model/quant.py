"""Weight-only int8 for decoding (`megads generate --weights int8`): the memory-bound case.

A decode step of a few rows reads every weight once for a handful of multiply-adds, so its speed
is bytes per step. `quantize_int8(model)` stores each projection weight [out, in] (and each routed
expert's [E, out, in]) as int8 with one float32 scale per output row (symmetric, absmax / 127) and
drops the float weight; activations and everything else keep their dtype. The product runs in
torch's int8-weight kernel (`torch._weight_int8pack_mm`, bf16 activations in, cast back), where
the device has it; elsewhere the weight is widened per call (correct, not faster).

Measured on this CPU (EPYC, 2 cores; `python bench/int8.py`, bench/RESULTS.md): for matrices of
~0.5M values and more the kernel beats the fp32 product 1.3-5x at 1-4 rows and loses at 16 or
more rows; for smaller ones (the `small` preset's experts, its q/kv projections) its fixed cost
makes it slower even at one row, so matrices under `min_elements` stay float. int8 is for
decoding a few rows, not for rollouts of 64. Left in float: the embedding (a lookup), the router
(float32 by design), MLA's kv up-projection (its weight is read directly by the absorbed
attention) and MTP (unused when decoding). Training never sees int8 weights: a quantized model
is for inference only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_KERNEL: dict[str, bool] = {}


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., out, in] -> (int8 [.., out, in], float32 scale [.., out]) with w ~ q * scale[.., None]."""
    w = w.detach().float()
    scale = (w.abs().amax(-1) / 127.0).clamp_min(1e-12)
    q = (w / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def _has_kernel(device: torch.device) -> bool:
    """Whether torch's int8-weight kernel runs on this device type (tried once)."""
    if device.type not in _KERNEL:
        try:
            x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
            torch._weight_int8pack_mm(x, torch.zeros(8, 32, dtype=torch.int8, device=device),
                                      torch.ones(8, dtype=torch.bfloat16, device=device))
            _KERNEL[device.type] = True
        except (RuntimeError, NotImplementedError, AttributeError):
            _KERNEL[device.type] = False
    return _KERNEL[device.type]


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [.., in] @ (q * scale)^T -> [.., out] in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], q.shape[0])
    if _has_kernel(x.device):
        y = torch._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), q, scale.to(torch.bfloat16))
    else:
        y = (flat @ q.t().to(flat.dtype)) * scale.to(flat.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def grouped_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """ops.grouped_linear with int8 expert weights q [E, out, in], scale [E, out]."""
    bounds = offsets.tolist()
    parts = [int8_linear(x[bounds[e]:bounds[e + 1]], q[e], scale[e])
             for e in range(q.shape[0]) if bounds[e + 1] > bounds[e]]
    return torch.cat(parts, 0) if parts else x.new_zeros(x.shape[0], q.shape[1])


def _quantize_param(module: nn.Module, name: str, keep: bool) -> int:
    """Replace module.<name> by int8 buffers <name>_int8 / <name>_scale; returns bytes saved."""
    w = getattr(module, name)
    q, s = quantize_weight(w)
    module.register_buffer(f"{name}_int8", q.to(w.device))
    module.register_buffer(f"{name}_scale", s.to(w.device))
    if keep:  # a tied weight another module still reads (the embedding): only the int8 copy is new
        return -(q.numel() + s.numel() * 4)
    delattr(module, name)
    return w.numel() * w.element_size() - q.numel() - s.numel() * 4


MIN_ELEMENTS = 1 << 19  # smaller matrices stay float: the kernel's fixed cost beats the bytes saved


@torch.no_grad()
def quantize_int8(model: nn.Module, min_elements: int = MIN_ELEMENTS) -> int:
    """Quantize `model`'s projection and expert weights of at least `min_elements` values per
    matrix (an expert's [out, in] counts alone) in place (see the module docstring). Returns the
    bytes of weights saved. The model is put in eval mode and must stay there."""
    from megads.model.mla import MLA
    from megads.model.moe import Experts
    from megads.parallel.tensor import ColumnParallelLinear, RowParallelLinear

    model.eval().requires_grad_(False)
    skip = {id(m.wkv_b) for m in model.modules() if isinstance(m, MLA)}
    skip |= {id(m) for blk in getattr(model, "mtp", []) for m in blk.modules()}
    shared = {id(p) for name, p in model.named_parameters() if "embed" in name}
    saved = 0
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, nn.Linear)):
            if m.weight.numel() >= min_elements:
                saved += _quantize_param(m, "weight", keep=id(m.weight) in shared)
        elif isinstance(m, Experts) and m.w1[0].numel() >= min_elements:
            for name in ("w1", "w2", "w3"):
                saved += _quantize_param(m, name, keep=False)
    return saved
