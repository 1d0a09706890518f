"""The MLA decode cache: per token per layer only the normalised latent c_kv and the rope key.

Never per-head keys or values: kv_lora_rank + qk_rope_head_dim values per token per layer.
Optionally the latent is quantized (int8 with a per-token float32 scale, or float8 e4m3 with a
per-token scale where torch has it); the rope key stays in the cache dtype.
"""
from __future__ import annotations

import torch

from megads.config import ModelConfig

_FP8 = getattr(torch, "float8_e4m3fn", None)


class LayerCache:
    """Cache storage of one attention layer: [B, max_len, kv_lora] and [B, max_len, rope]."""

    def __init__(self, batch, max_len, kv_lora, rope, dtype, device, quant: str | None):
        self.quant = quant
        self.latent = None
        if quant is None:
            # one buffer [B, max_len, kv_lora + rope]: kv and pe are views of it, so attention
            # scores all heads against both parts in one batched matmul (MLA._attend_absorbed)
            self.latent = torch.zeros(batch, max_len, kv_lora + rope, dtype=dtype, device=device)
            self.kv = self.latent[..., :kv_lora]
        elif quant == "int8":
            self.kv = torch.zeros(batch, max_len, kv_lora, dtype=torch.int8, device=device)
        elif quant == "float8":
            if _FP8 is None:
                raise ValueError("float8 cache needs torch.float8_e4m3fn, which this torch lacks")
            self.kv = torch.zeros(batch, max_len, kv_lora, dtype=_FP8, device=device)
        else:
            raise ValueError(f"quant must be None, 'int8' or 'float8', got {quant!r}")
        self.scale = (torch.ones(batch, max_len, 1, dtype=torch.float32, device=device)
                      if quant is not None else None)
        self.pe = (self.latent[..., kv_lora:] if self.latent is not None
                   else torch.zeros(batch, max_len, rope, dtype=dtype, device=device))
        self.dtype = dtype

    def write(self, start, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store latents kv [B, S, kv_lora] and rope keys pe [B, S, rope] at [start, start+S).

        start: an int, or a long tensor [S] of the positions on the cache's device (no host value:
        the fixed-shape decode step of megads.model.static, replayed as a CUDA graph)."""
        if isinstance(start, torch.Tensor):
            # index_put_ into whole buffers: torch.compile keeps it in place, while index_copy_
            # (or any write into a view of the buffer) was lowered to copying the whole cache out
            # and back at every step (~5 ms of a 64-row decode step of the small preset). So the
            # joint buffer gets the [latent | rope key] rows in one write
            if self.latent is not None:
                self.latent[:, start] = torch.cat([kv, pe], dim=-1).to(self.latent.dtype)
                return

            def put(dst, src):
                dst[:, start] = src
        else:
            end = start + kv.shape[1]

            def put(dst, src):
                dst[:, start:end] = src
        if self.quant is None:
            put(self.kv, kv.to(self.kv.dtype))
        else:
            qmax = 127.0 if self.quant == "int8" else 448.0
            amax = kv.detach().float().abs().amax(-1, keepdim=True).clamp_min(1e-8)
            scale = amax / qmax
            q = kv.detach().float() / scale
            put(self.kv, q.round().clamp(-127, 127).to(torch.int8) if self.quant == "int8" else q.to(_FP8))
            put(self.scale, scale)
        put(self.pe, pe.to(self.pe.dtype))

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, end, kv_lora] and rope keys [B, end, rope] in the cache dtype."""
        if self.quant is None:
            kv = self.kv[:, :end]
        else:
            kv = (self.kv[:, :end].float() * self.scale[:, :end]).to(self.dtype)
        return kv, self.pe[:, :end]

    def joint(self, end: int) -> torch.Tensor | None:
        """[latent | rope key] rows [B, end, kv_lora + rope] of an unquantized cache, else None."""
        return None if self.latent is None else self.latent[:, :end]

    def select_rows(self, index: torch.Tensor) -> "LayerCache":
        """A cache of len(index) rows: row i a copy of row index[i] (all max_len positions)."""
        new = LayerCache.__new__(LayerCache)
        new.quant, new.dtype = self.quant, self.dtype
        new.latent = None if self.latent is None else self.latent.index_select(0, index)
        kv_lora = self.kv.shape[-1]
        new.kv = new.latent[..., :kv_lora] if new.latent is not None else self.kv.index_select(0, index)
        new.pe = new.latent[..., kv_lora:] if new.latent is not None else self.pe.index_select(0, index)
        new.scale = None if self.scale is None else self.scale.index_select(0, index)
        return new

    def bytes_per_token(self) -> int:
        per = self.kv[0, 0].numel() * self.kv.element_size() + self.pe[0, 0].numel() * self.pe.element_size()
        if self.scale is not None:
            per += self.scale.element_size()
        return per


class MLACache:
    """Decode cache for a whole model: one LayerCache per attention layer (MTP excluded).

    `length` positions are filled (the same for every row: prompts are left-padded).
    `naive=True` makes attention expand the cache to per-head keys/values each step (tests only).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype=torch.float32, device=None,
                 quant: str | None = None, naive: bool = False, num_layers: int | None = None):
        n = cfg.num_layers if num_layers is None else num_layers
        self.layers = [LayerCache(batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device, quant)
                       for _ in range(n)]
        self.length = 0
        self.max_len = max_len
        self.naive = naive

    def advance(self, n: int) -> None:
        self.length += n
        if self.length > self.max_len:
            raise ValueError(f"MLACache overflow: {self.length} > max_len {self.max_len}")

    def bytes_per_token_per_layer(self) -> int:
        return self.layers[0].bytes_per_token()

    def bytes_per_token(self) -> int:
        return sum(layer.bytes_per_token() for layer in self.layers)

    def select_rows(self, index: torch.Tensor):
        return select_rows(self, index)


def select_rows(cache, index: torch.Tensor):
    """A copy of a whole-model cache (MLACache or mha.KVCache) with len(index) rows, row i a copy
    of row index[i], filled to the same length: generate prefills each distinct prompt once and
    gives every sample of it a copy of that prompt's rows."""
    new = type(cache).__new__(type(cache))
    new.__dict__.update(cache.__dict__)
    new.layers = [layer.select_rows(index) for layer in cache.layers]
    return new


def new_cache(cfg: ModelConfig, batch: int, max_len: int, **kw):
    """The decode cache of `cfg`'s attention: MLA's latent cache, or the per-head keys and values of
    the MHA baseline (megads.model.mha.KVCache); keyword arguments as MLACache's."""
    if cfg.attention == "mha":
        from megads.model.mha import KVCache

        return KVCache(cfg, batch, max_len, **kw)
    return MLACache(cfg, batch, max_len, **kw)
