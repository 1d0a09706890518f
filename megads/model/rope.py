"""Rotary position embedding for the decoupled rope dims, with YaRN context extension.

Layout: rotate-half (first half / second half of the rope dims form the pairs). HF DeepSeek
checkpoints store the rope dims interleaved; megads.hf permutes those weight rows on import.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from megads.config import ModelConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """Per-pair inverse frequencies [dim/2]: interpolated (/factor) below the correction range,
    extrapolated (unchanged) above it, a linear ramp between."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if factor <= 1:
        return inv.float()
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original_max)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original_max)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency pairs kept as they are
    return (inv / factor * (1 - extrapolate) + inv * extrapolate).float()


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions, computed on the fly (no max_seq_len-sized table)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # computed on the CPU, then moved to the device the model is built on: on the meta device
        # (megads.train.init.build_local; init_buffers fills it later) torch's arange would go
        # through its Python reference, whose first call imports torch._dynamo (1.5-2 s)
        with torch.device("cpu"):
            inv, self.attention_factor = self._tables(cfg)
        self.register_buffer("inv_freq", inv.to(torch.get_default_device()), persistent=False)

    @staticmethod
    def _tables(cfg: ModelConfig):
        """(inverse frequencies [dim/2] float32, cos/sin scale)."""
        dim = cfg.qk_rope_head_dim
        yarn = cfg.rope_scaling == "yarn" and cfg.rope_factor > 1
        if yarn:
            inv = yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_factor, cfg.original_max_seq_len,
                                cfg.beta_fast, cfg.beta_slow)
            # cos/sin scale (HF convention): the ratio of the two mscales (mscale 0 gives 1)
            return inv, yarn_get_mscale(cfg.rope_factor, cfg.mscale) / yarn_get_mscale(cfg.rope_factor,
                                                                                         cfg.mscale_all_dim)
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0

    def init_buffers(self) -> None:
        """Recompute the tables (after building on the meta device)."""
        with torch.device(self.inv_freq.device):
            inv, _ = self._tables(self.cfg)
        self.inv_freq.copy_(inv)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] or [B, S] -> cos, sin [.., S, dim] (rotate-half layout)."""
        ang = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [.., S, dim/2]
        ang = torch.cat([ang, ang], dim=-1)
        return (ang.cos() * self.attention_factor).to(dtype), (ang.sin() * self.attention_factor).to(dtype)


def softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale^2 under YaRN (mscale from mscale_all_dim)."""
    scale = cfg.head_dim_qk ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.rope_factor > 1 and cfg.mscale_all_dim:
        m = yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scale = scale * m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, d] (or [B, S, d]) with cos/sin [S, d] or [B, S, d]."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin
