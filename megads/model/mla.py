"""Multi-head Latent Attention (DeepSeek-V2/V3).

query:  c_q = RMSNorm(W_DQ h);  q = W_UQ c_q  (or q = W_Q h when q_lora_rank = 0)
kv:     [c_kv, k_pe] = W_DKV h;  c_kv = RMSNorm(c_kv);  [k_nope, v] = W_UKV c_kv  (per head)
score:  q_nope.k_nope + q_pe.k_pe   (k_pe: ONE rope key shared by all heads)

Three paths:
- training (no cache): whole sequences through scaled_dot_product_attention, causal;
- absorbed decode (cache): W_UK folded into the query and W_UV into the output, attention runs
  directly over the cached latents; the cache holds only c_kv and k_pe;
- naive decode (cache.naive): the cache expanded to per-head keys/values (kept for tests).
Heads are split over the TP group (latent down-projections replicated).
"""
from __future__ import annotations

import os

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megads.config import ModelConfig
from megads.model.cache import LayerCache
from megads.model.norm import RMSNorm
from megads.model.rope import apply_rope, softmax_scale
from megads.ops.grouped import row_kernels
from megads.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, copy_to_tp, gather_from_tp, project,
                                    group_size, normal_init_, scaled_init_std)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel=False):
        super().__init__()
        tp = group_size(tp_group)
        self.cfg = cfg
        self.n_heads = cfg.num_heads // tp  # local heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope + self.rope
        self.kv_lora = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        self.sequence_parallel = sequence_parallel and tp > 1
        self.tp_group = tp_group
        std = cfg.init_std
        col = dict(tp_group=tp_group, sequence_parallel=self.sequence_parallel, std=std)
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = ColumnParallelLinear(cfg.q_lora_rank, cfg.num_heads * self.qk_dim, tp_group=tp_group, std=std)
        else:
            self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * self.qk_dim, **col)
        self.wkv_a = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = ColumnParallelLinear(cfg.kv_lora_rank, cfg.num_heads * (self.nope + self.vdim),
                                          tp_group=tp_group, std=std)
        self.wo = RowParallelLinear(cfg.num_heads * self.vdim, cfg.hidden_size, tp_group=tp_group,
                                    sequence_parallel=self.sequence_parallel,
                                    std=scaled_init_std(std, cfg.num_layers))
        for lin in ([self.wq_a] if cfg.q_lora_rank else []) + [self.wkv_a]:
            normal_init_(lin.weight, std)
            lin.param_init = {"weight": std}

    # ------------------------------------------------------------------ projections
    def _gather_seq(self, x):
        """Full-sequence input for a replicated projection. Its gradient is identical on every
        TP rank, so the gather's backward is a split (not a reduce-scatter)."""
        return gather_from_tp(x, self.tp_group, dim=1) if self.sequence_parallel else x

    def _project(self, x, cos, sin):
        """x [B, S, D] -> q_nope [B,S,h,nope], q_pe [B,S,h,rope], c_kv [B,S,c], k_pe [B,S,rope]."""
        if self.cfg.q_lora_rank:
            q = self.wq_b(self.q_norm(project(self.wq_a, self._gather_seq(x))))
        else:
            q = self.wq(x)
        B, S = q.shape[:2]
        q = q.view(B, S, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv = project(self.wkv_a, self._gather_seq(x))
        c_kv, k_pe = kv.split([self.kv_lora, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin)  # [B, S, rope], shared by every head
        # k_pe feeds this rank's heads only: sum its gradient over TP so the replicated
        # down-projection sees the full gradient on every rank
        k_pe = copy_to_tp(k_pe, self.tp_group)
        return q_nope, q_pe, c_kv, k_pe

    def _expand(self, c_kv):
        """Latents [B, T, c] -> k_nope [B, T, h, nope], v [B, T, h, v]."""
        B, T = c_kv.shape[:2]
        kv = self.wkv_b(c_kv).view(B, T, self.n_heads, self.nope + self.vdim)
        return kv.split([self.nope, self.vdim], dim=-1)

    # ------------------------------------------------------------------ forward
    def forward(self, x, cos, sin, cache: LayerCache | None = None, start: int = 0, attn_mask=None,
                naive: bool = False):
        """x [B, S, D]. Without cache: causal attention over x (attn_mask [B, S] of kept keys
        optional). With cache: write this chunk at [start, start+S) and attend over [0, start+S)
        (attn_mask [B, start+S] of kept keys)."""
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        B, S = q_nope.shape[:2]
        if cache is None:
            out = self._attend_full(q_nope, q_pe, c_kv, k_pe, attn_mask)
        elif isinstance(start, torch.Tensor):
            # the fixed-shape decode step (megads.model.static): write at the positions `start`
            # (a device tensor), attend over the whole cache; attn_mask [B, max_len] keeps the
            # filled, unpadded positions, so one token's causal mask is the mask itself
            if S != 1 or naive or attn_mask is None:
                raise ValueError("a cache position given as a tensor is for one-token absorbed decode steps with a mask")
            cache.write(start, c_kv, k_pe)
            T = cache.kv.shape[1]
            out = self._attend_rows(q_nope, q_pe, cache.joint(T), attn_mask.bool())
            if out is None:
                kv_all, pe_all = cache.read(T)
                out = self._attend_absorbed(q_nope, q_pe, kv_all.to(x.dtype), pe_all.to(x.dtype),
                                            attn_mask.bool().view(B, 1, 1, -1), cache.joint(T))
        elif start == 0 and S > 1 and not naive:
            # prefill: causal SDPA over the prompt (expanded keys), then keep only the latents
            cache.write(0, c_kv, k_pe)
            out = self._attend_full(q_nope, q_pe, c_kv, k_pe, attn_mask)
        else:
            cache.write(start, c_kv, k_pe)
            out = None
            if S == 1 and not naive:  # one query position: its mask is the kept keys alone
                out = self._attend_rows(q_nope, q_pe, cache.joint(start + S),
                                        None if attn_mask is None else attn_mask.bool())
            if out is None:
                kv_all, pe_all = cache.read(start + S)
                mask = _decode_mask(B, S, start, attn_mask, x.device)
                if naive:
                    out = self._attend_naive(q_nope, q_pe, kv_all.to(x.dtype), pe_all.to(x.dtype), mask)
                else:
                    out = self._attend_absorbed(q_nope, q_pe, kv_all.to(x.dtype), pe_all.to(x.dtype), mask,
                                                cache.joint(start + S))
        return self.wo(out.reshape(B, S, self.n_heads * self.vdim))

    def _attend_full(self, q_nope, q_pe, c_kv, k_pe, key_mask):
        B, S = q_nope.shape[:2]
        k_nope, v = self._expand(c_kv)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, h, S, qk]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, self.n_heads, self.rope)], dim=-1).transpose(1, 2)
        return masked_attention(q, k, v.transpose(1, 2), key_mask, self.scale).transpose(1, 2)  # [B, S, h, v]

    def _attend_naive(self, q_nope, q_pe, kv, pe, mask):
        """Reference decode: expand every cached latent to per-head keys/values."""
        k_nope, v = self._expand(kv)  # [B, T, h, *]
        scores = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope)
                  + torch.einsum("bshr,btr->bhst", q_pe, pe)) * self.scale
        p = _masked_softmax(scores, mask).to(v.dtype)
        return torch.einsum("bhst,bthv->bshv", p, v)

    def _absorb_uk(self):
        """W_UK [h, nope, c] and W_UV [h, v, c]: views of wkv_b's weight."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.vdim, self.kv_lora)
        return w[:, :self.nope], w[:, self.nope:]

    def _attend_rows(self, q_nope, q_pe, joint, key_mask):
        """One query position per row through the native decode-attention kernel
        (megads::latent_attention_rows: the cache read once, online softmax), when it applies:
        a float32 CPU cache held as one [latent | rope key] buffer, no autograd, native ops.
        key_mask: [B, T] bool kept keys, or None. Returns [B, 1, h, v], or None."""
        if joint is None or joint.dtype != torch.float32 or not row_kernels(q_nope, q_pe, joint):
            return None
        w_uk, w_uv = self._absorb_uk()
        B = q_nope.shape[0]
        # per-head products as bmm over the heads (about half einsum's time at these sizes)
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), w_uk).transpose(0, 1)  # [B, h, c]
        q = torch.cat([q_lat, q_pe[:, 0]], dim=-1)  # [B, h, c + rope]
        o_lat = torch.ops.megads.latent_attention_rows(q, joint, key_mask, self.kv_lora, self.scale)
        out = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [h, B, v]
        return out.transpose(0, 1).reshape(B, 1, self.n_heads, self.vdim)

    def _attend_absorbed(self, q_nope, q_pe, kv, pe, mask, joint=None):
        """Absorbed decode: q_lat = q_nope W_UK (per head), out = (p . c_kv) W_UV.

        joint: the cache's [c_kv | k_pe] rows [B, T, c + rope] (kv and pe are views of it), when
        it holds them in the compute dtype: the scores are then one batched product."""
        w_uk, w_uv = self._absorb_uk()  # [h, nope, c], [h, v, c]
        B, S = q_nope.shape[:2]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [B, S, h, c]
        if joint is not None and joint.dtype == q_lat.dtype:
            # [c_kv | k_pe] (T rows) times the (S*h) queries [q_lat | q_pe]: the T cached rows
            # are the long side of the product (the faster order on CPU), transposed back after
            q = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).reshape(B, S * self.n_heads, -1)
            scores = torch.bmm(joint, q.transpose(1, 2)).transpose(1, 2)  # [B, S*h, T]
        else:  # one batched matmul over (S*h) query rows against the T cached latents
            scores = torch.bmm(q_lat.reshape(B, S * self.n_heads, self.kv_lora), kv.transpose(1, 2))
            scores = scores + torch.bmm(q_pe.reshape(B, S * self.n_heads, self.rope), pe.transpose(1, 2))
        scores = scores.reshape(B, S, self.n_heads, -1).transpose(1, 2) * self.scale  # [B, h, S, T]
        p = _masked_softmax(scores, mask).to(kv.dtype)
        o_lat = torch.bmm(p.transpose(1, 2).reshape(B, S * self.n_heads, -1), kv)  # [B, S*h, c]
        o_lat = o_lat.view(B, S, self.n_heads, self.kv_lora)
        return torch.einsum("bshc,hvc->bshv", o_lat, w_uv)


@dataclass(frozen=True)
class SharedPrefixMask:
    """The attention mask of rows laid out as [a shared prefix of `prefix` positions | `group`
    segments of (S - prefix) / group positions] (Transformer.forward's shared_prefix): causal,
    kept keys only (keep [B, S]), and a segment sees the prefix and itself. `attend` runs it as
    two products instead of one dense masked one: the prefix's causal self-attention, and each
    segment against [prefix | itself] (the query-key pairs of the sequences unpacked, each prefix
    query once)."""

    keep: torch.Tensor
    prefix: int
    group: int

    def attend(self, q, k, v, scale):
        """q, k, v [B, h, S, d] -> [B, h, S, d_v]."""
        B, h, S, _ = q.shape
        P, g = self.prefix, self.group
        C = (S - P) // g
        keep = self.keep.bool()

        def segments(t):  # [B, h, S, d] -> [B * g, h, C, d]
            return t[:, :, P:].reshape(B, h, g, C, t.shape[-1]).transpose(1, 2).reshape(B * g, h, C, t.shape[-1])

        def prefix_per_segment(t):  # [B, h, S, d] -> [B * g, h, P, d]
            return t[:, :, :P].unsqueeze(1).expand(B, g, h, P, t.shape[-1]).reshape(B * g, h, P, t.shape[-1])

        k_seg = torch.cat([prefix_per_segment(k), segments(k)], dim=2)
        v_seg = torch.cat([prefix_per_segment(v), segments(v)], dim=2)
        keys = torch.cat([keep[:, :P].unsqueeze(1).expand(B, g, P), keep[:, P:].reshape(B, g, C)], dim=2)
        # each segment's C queries are the last of its P + C keys: the prefix, then causal
        o_seg = _causal(segments(q), k_seg, v_seg, keys.reshape(B * g, P + C), scale)
        o_seg = o_seg.reshape(B, g, h, C, -1).transpose(1, 2).reshape(B, h, g * C, -1)
        if P == 0:
            return o_seg
        o_pre = _causal(q[:, :, :P], k[:, :, :P], v[:, :, :P], keep[:, :P], scale)
        return torch.cat([o_pre, o_seg], dim=2)


def native_attention(q) -> bool:
    """Whether causal attention takes megads::causal_attention: float32/float64 CPU tensors, native
    ops loaded (twice SDPA's CPU flash kernel at the small preset's shapes, bench/RESULTS.md), and
    MEGADS_ATTENTION not `sdpa` (unset or `auto`: the kernel where it applies)."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return False
    want = os.environ.get("MEGADS_ATTENTION", "auto").strip().lower()
    if want not in ("auto", "sdpa"):
        raise ValueError(f"MEGADS_ATTENTION must be 'auto' or 'sdpa', got {want!r}")
    if want == "sdpa":
        return False
    from megads import ops
    from megads.ops import native

    return ops.backend() == "native" and native.has_attention_kernel()


def _causal(q, k, v, keep, scale):
    """q [B, h, Sq, d], k [B, h, Sk, d], v [B, h, Sk, d_v] (Sq <= Sk, the queries the last Sq
    positions: query i sees keys j <= Sk - Sq + i), keep [B, Sk] bool kept keys or None ->
    [B, h, Sq, d_v]; query rows with no kept key give zeros. The native kernel where it applies
    (it takes [B, S, h, d] views: no copies), else SDPA (values padded to the keys' head dim for
    its fused kernel: zeros change nothing)."""
    if native_attention(q):
        return torch.ops.megads.causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep,
                                                 scale)[0].transpose(1, 2)
    vdim, Sq, Sk = v.shape[-1], q.shape[2], k.shape[2]
    if vdim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - vdim))
    if keep is None and Sq == Sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :vdim]
    mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    if keep is not None:
        mask = mask & keep.view(keep.shape[0], 1, 1, Sk)
    return torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))[..., :vdim]


def masked_attention(q, k, v, key_mask, scale):
    """Causal self-attention q, k, v [B, h, S, d] -> [B, h, S, d_v] under key_mask: None, [B, S]
    kept keys (left padding), a full [B, 1, S, S] mask (packed documents) or a SharedPrefixMask.
    Query rows with no kept key give zeros."""
    if isinstance(key_mask, SharedPrefixMask):
        return key_mask.attend(q, k, v, scale)
    if key_mask is None or key_mask.dim() == 2:
        return _causal(q, k, v, None if key_mask is None else key_mask.bool(), scale)
    vdim = v.shape[-1]
    if vdim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - vdim))
    return torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale))[..., :vdim]


def _decode_mask(B, S, start, key_mask, device):
    """Bool mask [B, 1, S, start+S]: causal over absolute positions, and kept keys only."""
    T = start + S
    q_pos = torch.arange(start, T, device=device).unsqueeze(-1)
    k_pos = torch.arange(T, device=device).unsqueeze(0)
    causal = (k_pos <= q_pos).view(1, 1, S, T)
    if key_mask is None:
        return causal.expand(B, 1, S, T)
    return causal & key_mask.bool().view(B, 1, 1, T)


def _masked_softmax(scores, mask):
    """Softmax in float32 over the kept keys; rows with no kept key give zeros."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1))
