"""Analytic model figures from a config alone (no weights): parameters, FLOPs, KV-cache bytes.

Conventions (stated in `megads model-info` output):
- total_params: every weight of the main model (embedding, head, all experts); MTP modules are
  reported separately (DeepSeek-V3's 671B excludes its 14B MTP module).
- active_params: weights a token touches: attention, dense MLPs, shared experts, the router and
  num_experts_per_tok routed experts per MoE layer, plus embedding and head.
- flops_per_token (training): 3 x forward; forward = 2 x active matmul weights (no embedding
  lookup, no RMSNorm weights) + causal attention, 2 x n_h x (qk_head + v_head) x seq_len/2 per
  layer, at `seq_len` (argument, default 4096).
- decode_flops_per_token(c, context): one decode step's forward per row over `context` cached
  positions (absorbed MLA: W_UK/W_UV on the query and output, scores and sums over the latents).
- mtp_flops_per_token: what the MTP modules add to flops_per_token (their blocks, projections and
  the shared output head); a training run costs (flops_per_token + mtp_flops_per_token) x tokens.
- kv_cache_bytes_per_token: the decode cache of the model's own attention. MLA caches
  kv_lora_rank + qk_rope_head_dim values per layer (also `kv_cache_bytes_per_token_mla`); the
  per-head cache of the same model, which the MHA baseline (model.attention: mha) holds, stores
  n_h x (qk_head + v_head); an MHA of the same width (n_h heads of v_head_dim) stores 2 x n_h x v_head_dim.
"""
from __future__ import annotations

from megads.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8": 1}


def attention_params(c: ModelConfig) -> int:
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.attention == "mha":  # fused W_QKV (q, k of qk dims, v) and W_O (megads/model/mha.py)
        return c.hidden_size * c.num_heads * (2 * qk + c.v_head_dim) + c.num_heads * c.v_head_dim * c.hidden_size
    if c.q_lora_rank:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.num_heads * qk
    else:
        q = c.hidden_size * c.num_heads * qk
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)
    o = c.num_heads * c.v_head_dim * c.hidden_size
    return q + kv + o


def _mlp(dim: int, inter: int) -> int:
    return 3 * dim * inter


def layer_params(c: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active) weights of one block."""
    norms = 2 * c.hidden_size
    attn = attention_params(c) + norms
    if not moe:
        mlp = _mlp(c.hidden_size, c.intermediate_size)
        return attn + mlp, attn + mlp
    expert = _mlp(c.hidden_size, c.moe_intermediate_size)
    shared = c.n_shared_experts * expert
    router = c.n_routed_experts * c.hidden_size
    total = attn + shared + router + c.n_routed_experts * expert
    active = attn + shared + router + c.num_experts_per_tok * expert
    return total, active


def param_counts(c: ModelConfig) -> dict:
    emb = c.vocab_size * c.hidden_size
    head = 0 if c.tie_embeddings else c.vocab_size * c.hidden_size
    total = active = emb + head + c.hidden_size
    for i in range(c.num_layers):
        t, a = layer_params(c, c.is_moe_layer(i))
        total += t
        active += a
    mt, ma = layer_params(c, c.n_routed_experts > 0)
    mtp = c.mtp_depth * (mt + 2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size)
    return {"total_params": total, "active_params": active, "mtp_params": mtp,
            "embedding_params": emb + head}


def _block_norm_weights(c: ModelConfig) -> int:
    """RMSNorm weights of one block (attention and MLP norms, MLA's latent norms): no products."""
    mla = 0 if c.attention == "mha" else c.q_lora_rank + c.kv_lora_rank
    return 2 * c.hidden_size + mla


def _product_weights(c: ModelConfig) -> int:
    """Active weights a token's forward multiplies by: all but the input embedding, whose lookup
    costs no FLOPs (with tied embeddings the one matrix is the head's, and it does), and the
    RMSNorm weights (a scale, no product)."""
    active = param_counts(c)["active_params"] - c.num_layers * _block_norm_weights(c) - c.hidden_size
    return active if c.tie_embeddings else active - c.vocab_size * c.hidden_size


def flops_per_token(c: ModelConfig, seq_len: int = 4096) -> int:
    """Training FLOPs per token: 3 x (2 x active matmul weights + causal attention)."""
    matmul = _product_weights(c)
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = c.num_layers * 2 * c.num_heads * (qk + c.v_head_dim) * (seq_len / 2)
    return int(3 * (2 * matmul + attn))


def decode_flops_per_token(c: ModelConfig, context: int) -> int:
    """Forward FLOPs of one decode step per row, attending over `context` cached positions (the
    new one included), as megads's decode computes it: 2 x active matmul weights (no embedding
    lookup, no RMSNorm weights; MLA's W_UK and W_UV are applied once to the query and once to the
    output, so they count as weights) + per layer the attention over the cache: MLA's absorbed
    form scores each head against the [latent | rope key] rows (2 x n_h x (kv_lora + rope) x
    context) and sums the latents (2 x n_h x kv_lora x context); the MHA baseline 2 x n_h x
    (qk + v) x context. The MTP modules do not run in decoding. A bench divides a step's FLOPs
    (rows x this) by its time and the measured matmul peak: the share of the peak a decode step
    reaches, or would need."""
    if c.attention == "mha":
        per_pos = c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    else:
        per_pos = c.num_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    return int(2 * _product_weights(c) + c.num_layers * 2 * per_pos * context)


def kv_cache_bytes(c: ModelConfig, dtype: str | None = None) -> dict:
    b = DTYPE_BYTES[dtype or c.cache_dtype]
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    mla = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_layers * b
    per_head = c.num_heads * (qk + c.v_head_dim) * c.num_layers * b
    mha = 2 * c.num_heads * c.v_head_dim * c.num_layers * b
    own = per_head if c.attention == "mha" else mla  # what this model's decode cache holds
    return {"mla": mla, "per_head_same_model": per_head, "mha_same_width": mha, "this_model": own}


def mtp_flops_per_token(c: ModelConfig, seq_len: int = 4096) -> int:
    """Training FLOPs per token of the MTP modules (not in `flops_per_token`): per depth, 3 x (2 x
    (its block's active weights + the 2d->d projection + the shared output head) + its attention).
    Per token of the sequence: depth k runs on seq_len - k positions, so this counts k / seq_len
    more than its products compute (bench/train_floor.py counts them exactly with mtp_depth 0)."""
    if not c.mtp_depth:
        return 0
    block = layer_params(c, c.n_routed_experts > 0)[1] - _block_norm_weights(c)
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = 2 * c.num_heads * (qk + c.v_head_dim) * (seq_len / 2)
    per_depth = 2 * (block + 2 * c.hidden_size * c.hidden_size + c.vocab_size * c.hidden_size) + attn
    return int(3 * c.mtp_depth * per_depth)


def model_info(c: ModelConfig, seq_len: int = 4096) -> dict:
    counts = param_counts(c)
    kv = kv_cache_bytes(c)
    return {**counts, "flops_per_token": flops_per_token(c, seq_len), "flops_seq_len": seq_len,
            "mtp_flops_per_token": mtp_flops_per_token(c, seq_len), "attention": c.attention,
            "kv_cache_bytes_per_token": kv["this_model"], "kv_cache_bytes_per_token_mla": kv["mla"],
            "kv_cache_bytes_per_token_per_head": kv["per_head_same_model"],
            "kv_cache_bytes_per_token_mha": kv["mha_same_width"], "cache_dtype": c.cache_dtype}


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_info(name: str, info: dict) -> str:
    kv, ph, mha = (info["kv_cache_bytes_per_token_mla"], info["kv_cache_bytes_per_token_per_head"],
                   info["kv_cache_bytes_per_token_mha"])
    rows = [
        (f"model", name),
        ("total parameters", f"{_human(info['total_params'])} ({info['total_params']:,})"),
        ("activated parameters", f"{_human(info['active_params'])} ({info['active_params']:,})"),
        ("MTP parameters (extra)", f"{_human(info['mtp_params'])}"),
        (f"training FLOPs/token (seq {info['flops_seq_len']})", f"{_human(info['flops_per_token'])}"),
        *_extra_rows(info),
        (f"KV cache/token, MLA latent ({info['cache_dtype']})", f"{kv:,} B"),
        ("KV cache/token, per-head K/V of this model", f"{ph:,} B ({ph / kv:.1f}x MLA)"),
        ("KV cache/token, MHA of the same width", f"{mha:,} B ({mha / kv:.1f}x MLA)"),
    ]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _extra_rows(info: dict) -> list[tuple[str, str]]:
    """model-info rows of the MTP modules' FLOPs and of the MHA baseline's own cache."""
    rows = []
    if info.get("mtp_flops_per_token"):
        rows.append(("+ MTP modules FLOPs/token", f"{_human(info['mtp_flops_per_token'])}"))
    if info.get("attention") == "mha":
        own, mla = info["kv_cache_bytes_per_token"], info["kv_cache_bytes_per_token_mla"]
        rows.append((f"attention mha: KV cache/token ({info['cache_dtype']})", f"{own:,} B ({own / mla:.1f}x the MLA latent)"))
    return rows
