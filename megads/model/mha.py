"""Standard multi-head attention: the baseline MLA is measured against (DeepSeek-V2 §2.1, App. D).

    [q_h; k_h; v_h] = W_QKV h            for every head h (q, k: d_qk = nope + rope dims; v: d_v)
    q_h, k_h:  RoPE on their last qk_rope_head_dim dims (partial rotary, as GPT-NeoX), per head
    o = W_O [softmax(q_h k_h^T / sqrt(d_qk)) v_h]_h

The width is the model's MLA width: the same heads, head dims, softmax scale and RoPE/YaRN
tables, so the two differ only where the paper says they do: MHA projects every head's key and
value from the hidden state and must cache them (n_h x (d_qk + d_v) values per token per layer),
where MLA caches one latent and one shared rope key (kv_lora_rank + qk_rope_head_dim).

Tensor parallelism: W_QKV is one column-parallel projection whose output rows are laid out per
head ([h][q | k | v]), so a TP rank's contiguous rows are whole heads; W_O is row-parallel.
Under sequence parallelism W_QKV gathers the sequence and W_O reduce-scatters it, as in MLA.
The decode cache (`KVCache`) holds this rank's heads only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megads.config import ModelConfig
from megads.model.mla import _decode_mask, masked_attention
from megads.model.rope import apply_rope, softmax_scale
from megads.parallel.tensor import ColumnParallelLinear, RowParallelLinear, group_size, scaled_init_std


class MHA(nn.Module):
    """Multi-head attention with per-head keys and values; `forward` as MLA's."""

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel=False):
        super().__init__()
        tp = group_size(tp_group)
        self.cfg = cfg
        self.n_heads = cfg.num_heads // tp  # local heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope + self.rope
        self.scale = softmax_scale(cfg)
        self.sequence_parallel = sequence_parallel and tp > 1
        std = cfg.init_std
        self.wqkv = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * (2 * self.qk_dim + self.vdim),
                                         tp_group=tp_group, sequence_parallel=self.sequence_parallel, std=std)
        self.wo = RowParallelLinear(cfg.num_heads * self.vdim, cfg.hidden_size, tp_group=tp_group,
                                    sequence_parallel=self.sequence_parallel,
                                    std=scaled_init_std(std, cfg.num_layers))

    def _project(self, x, cos, sin):
        """x [B, S(/tp), D] -> q, k [B, S, h, d_qk] (rope applied), v [B, S, h, d_v]."""
        qkv = self.wqkv(x)  # [B, S, h * (2 d_qk + d_v)]: this rank's heads, full sequence
        B, S = qkv.shape[:2]
        q, k, v = qkv.view(B, S, self.n_heads, 2 * self.qk_dim + self.vdim).split(
            [self.qk_dim, self.qk_dim, self.vdim], dim=-1)
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        return q, k, v

    def _rope(self, t, cos, sin):
        """Rotate the last qk_rope_head_dim dims of every head; t [B, S, h, d_qk]."""
        nope, pe = t.split([self.nope, self.rope], dim=-1)
        return torch.cat([nope, apply_rope(pe, cos, sin)], dim=-1)

    def forward(self, x, cos, sin, cache: "KVLayerCache | None" = None, start: int = 0, attn_mask=None,
                naive: bool = False):
        """x [B, S, D]. Without cache: causal attention over x (attn_mask: [B, S] kept keys or a
        [B, 1, S, S] mask). With cache: write this chunk's keys/values at [start, start+S) and
        attend over [0, start+S) (attn_mask [B, start+S] of kept keys). `naive` has no meaning
        here (MHA has one decode path); it is accepted so the block can call either attention."""
        q, k, v = self._project(x, cos, sin)
        B, S = q.shape[:2]
        if cache is None:
            out = self._attend_full(q, k, v, attn_mask)
        elif start == 0 and S > 1:
            cache.write(0, k, v)  # prefill: causal attention over the prompt
            out = self._attend_full(q, k, v, attn_mask)
        else:
            cache.write(start, k, v)
            k_all, v_all = cache.read(start + S)
            out = self._attend_cached(q, k_all.to(q.dtype), v_all.to(q.dtype),
                                      _decode_mask(B, S, start, attn_mask, x.device))
        return self.wo(out.reshape(B, S, self.n_heads * self.vdim))

    def _attend_full(self, q, k, v, key_mask):
        """q, k [B, S, h, d_qk], v [B, S, h, d_v] -> [B, S, h, d_v], causal (+ key_mask)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, S, d]
        return masked_attention(q, k, v, key_mask, self.scale).transpose(1, 2)

    def _attend_cached(self, q, k, v, mask):
        """Decode: q [B, S, h, d_qk] against the cached k [B, T, h, d_qk], v [B, T, h, d_v];
        mask [B, 1, S, T] -> [B, S, h, d_v]."""
        scores = torch.einsum("bshd,bthd->bhst", q, k) * self.scale  # [B, h, S, T]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in >= float32
        p = torch.nan_to_num(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1))  # rows without keys: 0
        return torch.einsum("bhst,bthv->bshv", p.to(v.dtype), v)


class KVLayerCache:
    """One MHA layer's decode cache: keys [B, max_len, h, d_qk] and values [B, max_len, h, d_v] of
    this rank's heads. Storage is allocated at the first write, when the local head count (the
    TP split) and the dtype are known."""

    def __init__(self, batch: int, max_len: int, dtype, device):
        self.batch, self.max_len, self.dtype, self.device = batch, max_len, dtype, device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k [B, S, h, d_qk] and v [B, S, h, d_v] at positions [start, start+S)."""
        if self.k is None:
            dev = self.device if self.device is not None else k.device
            self.k = torch.zeros(self.batch, self.max_len, *k.shape[2:], dtype=self.dtype, device=dev)
            self.v = torch.zeros(self.batch, self.max_len, *v.shape[2:], dtype=self.dtype, device=dev)
        end = start + k.shape[1]
        self.k[:, start:end] = k.detach().to(self.dtype)
        self.v[:, start:end] = v.detach().to(self.dtype)

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [B, end, h, d_qk] and values [B, end, h, d_v]."""
        return self.k[:, :end], self.v[:, :end]

    def select_rows(self, index: torch.Tensor) -> "KVLayerCache":
        """A cache of len(index) rows: row i a copy of row index[i] (all max_len positions)."""
        new = KVLayerCache(len(index), self.max_len, self.dtype, self.device)
        if self.k is not None:
            new.k, new.v = self.k.index_select(0, index), self.v.index_select(0, index)
        return new

    def bytes_per_token(self) -> int:
        if self.k is None:
            return 0
        return self.k[0, 0].numel() * self.k.element_size() + self.v[0, 0].numel() * self.v.element_size()


class KVCache:
    """Decode cache of an MHA model: one KVLayerCache per attention layer (MTP excluded); the same
    interface as MLACache (`layers`, `length`, `advance`, `bytes_per_token`)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype=torch.float32, device=None,
                 quant: str | None = None, naive: bool = False, num_layers: int | None = None):
        if quant is not None:
            raise ValueError(f"a quantized decode cache ({quant!r}) is an MLA-latent feature; model.attention "
                             f"mha keeps its keys and values in the model dtype")
        n = cfg.num_layers if num_layers is None else num_layers
        self.layers = [KVLayerCache(batch, max_len, dtype, device) for _ in range(n)]
        self.length = 0
        self.max_len = max_len
        self.naive = naive

    def advance(self, n: int) -> None:
        self.length += n
        if self.length > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} > max_len {self.max_len}")

    def bytes_per_token_per_layer(self) -> int:
        return self.layers[0].bytes_per_token()

    def bytes_per_token(self) -> int:
        return sum(layer.bytes_per_token() for layer in self.layers)

    def select_rows(self, index: torch.Tensor):
        from megads.model.cache import select_rows

        return select_rows(self, index)
