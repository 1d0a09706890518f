"""RMSNorm: NVIDIA Apex's fused kernel on CUDA when importable; on CPU in float32 the native
megads::rms_norm_rows where the library has it (with autograd: its native backward); torch's
rms_norm otherwise."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megads.ops.grouped import row_kernels

try:  # optional, built from source on GPU clusters; the PyPI "apex" is an unrelated package
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm  # type: ignore
except Exception:  # pragma: no cover - not on CPU machines
    _ApexRMSNorm = None


def _native_training(x: torch.Tensor, w: torch.Tensor) -> bool:
    """rms_norm_rows with its native backward applies: float32 CPU tensors, native ops loaded
    (F.rms_norm's CPU backward is ~8 elementwise passes; bench/RESULTS.md)."""
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu":
        return False
    from megads import ops
    from megads.ops import native

    return ops.backend() == "native" and native.has_rms_norm_backward()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, sp_group=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.param_init = {"weight": "ones"}
        # in a sequence-parallel region each TP rank normalises its own sequence chunk: the
        # weight's gradient is partial and is summed over TP in backward
        self.sp_group = sp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp_group is not None:
            from megads.parallel.tensor import copy_to_tp

            w = copy_to_tp(self.weight, self.sp_group)
            dt = torch.promote_types(x.dtype, torch.float32)
            return F.rms_norm(x.to(dt), (x.shape[-1],), w.to(dt), self.eps).to(x.dtype)
        if _ApexRMSNorm is not None and x.is_cuda:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # type: ignore

            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        if x.dim() >= 1 and (row_kernels(x, self.weight) or _native_training(x, self.weight)):
            # float32 on CPU: one native pass (with autograd: its native backward, one pass too)
            return torch.ops.megads.rms_norm_rows(x, self.weight, self.eps)
        # normalise in (at least) float32 like the reference implementations, then cast back
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dt), (x.shape[-1],), self.weight.to(dt), self.eps).to(x.dtype)
