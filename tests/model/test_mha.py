"""The MHA baseline (model.attention: mha): the whole model against a float64 reference written
here from the textbook formulas (embedding, RMSNorm, per-head attention with partial RoPE, SwiGLU,
head), the decode cache against the full forward, left padding, its cache size against
model-info, gradcheck; and the default MLA path untouched by the option."""
from __future__ import annotations

import math

import pytest
import torch

from megads.config import ModelConfig
from megads.model.cache import MLACache, new_cache
from megads.model.info import kv_cache_bytes, model_info
from megads.model.mha import MHA, KVCache
from megads.model.mla import MLA
from megads.model.transformer import Transformer


def mha_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=37, hidden_size=24, intermediate_size=40, moe_intermediate_size=8, num_layers=2,
                first_k_dense=2, num_heads=3, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4,
                v_head_dim=5, n_routed_experts=0, max_seq_len=64, init_std=0.2, attention="mha")
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # norms away from 1, so a missed norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    # the rope tables exact in float64 (megads keeps float32 ones; they are checked in test_mla.py)
    model.rope.inv_freq = float64_inv_freq(cfg)
    return model


def float64_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.qk_rope_head_dim
    return cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def float64_tables(cfg: ModelConfig, S: int):
    """cos, sin [S, d] in the rotate-half layout, float64."""
    ang = torch.arange(S, dtype=torch.float64).unsqueeze(-1) * float64_inv_freq(cfg)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


# ----------------------------------------------------------------------------- a float64 reference

def rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the last dim of x [S, d], written per pair: (x_i, x_{i+d/2}) turned by
    pos * theta^(-2i/d)."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        ang = pos.double() * theta ** (-2 * i / d)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., i + d // 2] = b * torch.cos(ang) + a * torch.sin(ang)
    return out


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_attention(p: dict, pre: str, cfg: ModelConfig, x: torch.Tensor, key_mask=None) -> torch.Tensor:
    """Standard MHA, one sequence at a time and one head at a time. x [B, S, D]."""
    B, S, _ = x.shape
    H, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    dqk = dn + dr
    W = p[pre + "wqkv.weight"].view(H, 2 * dqk + dv, cfg.hidden_size)  # rows laid out per head: q | k | v
    out = torch.zeros(B, S, H * dv, dtype=torch.float64)
    pos = torch.arange(S)
    for b in range(B):
        for h in range(H):
            q = x[b] @ W[h, :dqk].T  # [S, dqk]
            k = x[b] @ W[h, dqk:2 * dqk].T
            v = x[b] @ W[h, 2 * dqk:].T  # [S, dv]
            q = torch.cat([q[:, :dn], rope_ref(q[:, dn:], pos, cfg.rope_theta)], -1)
            k = torch.cat([k[:, :dn], rope_ref(k[:, dn:], pos, cfg.rope_theta)], -1)
            s = q @ k.T / math.sqrt(dqk)
            allowed = torch.ones(S, S, dtype=torch.bool).tril()
            if key_mask is not None:
                allowed &= key_mask[b].bool().unsqueeze(0)
            s = s.masked_fill(~allowed, float("-inf"))
            out[b, :, h * dv:(h + 1) * dv] = torch.nan_to_num(torch.softmax(s, -1)) @ v
    return out @ p[pre + "wo.weight"].T


def ref_model(model: Transformer, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of a dense MHA decoder, float64."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    eps = cfg.rms_norm_eps
    h = p["embed.weight"][tokens]
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        h = h + ref_attention(p, pre + "attn.", cfg, rms(h, p[pre + "attn_norm.weight"], eps))
        x = rms(h, p[pre + "ffn_norm.weight"], eps)
        a, g = x @ p[pre + "ffn.w1.weight"].T, x @ p[pre + "ffn.w3.weight"].T
        h = h + (a * torch.sigmoid(a) * g) @ p[pre + "ffn.w2.weight"].T
    return rms(h, p["norm.weight"], eps) @ p["head.weight"].T


# ----------------------------------------------------------------------------- tests

def test_mha_model_matches_float64_reference():
    cfg = mha_cfg()
    model = make(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = ref_model(model, cfg, tokens)
    labels = tokens.roll(-1, 1)
    out = model(tokens, labels)
    logits = model(tokens, local_logits=True).logits  # float64, this (only) vocab shard
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
    ce = torch.nn.functional.cross_entropy(expected.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    assert float(out.lm_loss) == pytest.approx(float(ce), rel=1e-6)  # megads's cross-entropy runs in float32
    assert isinstance(model.layers[0].attn, MHA)


def test_mha_key_mask_matches_reference():
    cfg = mha_cfg()
    torch.manual_seed(1)
    attn = MHA(cfg).double()
    B, S = 2, 7
    x = torch.randn(B, S, cfg.hidden_size, dtype=torch.float64)
    cos, sin = float64_tables(cfg, S)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    p = {f"attn.{k}": v.double() for k, v in attn.state_dict().items()}
    expected = ref_attention(p, "attn.", cfg, x, mask)
    got = attn(x, cos, sin, attn_mask=mask)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("moe", [False, True])
def test_decode_cache_equals_full_forward(moe):
    extra = dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense=1) if moe else {}
    cfg = mha_cfg(**extra)
    model = make(cfg, seed=2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens, local_logits=True).logits
        cache = new_cache(cfg, 2, 12, dtype=torch.float64)
        assert isinstance(cache, KVCache)
        parts = [model(tokens[:, :5], cache=cache, local_logits=True).logits]
        for t in range(5, 12):
            parts.append(model(tokens[:, t:t + 1], cache=cache, local_logits=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)
    assert cache.length == 12


def test_left_padded_generation_matches_the_prompt_alone():
    cfg = mha_cfg()
    model = make(cfg, seed=5).float()
    g = torch.Generator().manual_seed(6)
    short, long = torch.randint(3, cfg.vocab_size, (1, 4), generator=g), torch.randint(3, cfg.vocab_size, (1, 7), generator=g)
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0, 3:], batch[1] = short[0], long[0]
    mask = batch != 0
    mask[1] = True
    out = model.generate(batch, max_new_tokens=5, attention_mask=mask, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=5)
    assert out[0, 7:].tolist() == alone[0, 4:].tolist()


def test_cache_bytes_match_model_info():
    cfg = mha_cfg()
    model = make(cfg).float()
    cache = new_cache(cfg, 1, 8, dtype=torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    per_layer = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    assert cache.bytes_per_token() == cfg.num_layers * per_layer
    assert kv_cache_bytes(cfg, "float32")["this_model"] == cache.bytes_per_token()
    # MLA of the same shapes caches its latent and rope key only; model-info reports each
    mla = mha_cfg(attention="mla")
    assert model_info(mla)["kv_cache_bytes_per_token"] == model_info(cfg)["kv_cache_bytes_per_token_mla"]
    info = model_info(cfg)
    assert info["attention"] == "mha" and info["kv_cache_bytes_per_token"] > info["kv_cache_bytes_per_token_mla"]
    with pytest.raises(ValueError, match="quantized"):
        new_cache(cfg, 1, 8, quant="int8")


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_param_counts_match_a_built_model(attention):
    cfg = mha_cfg(attention=attention, n_routed_experts=4, num_experts_per_tok=2, first_k_dense=1, mtp_depth=1)
    model = Transformer(cfg)
    info = model_info(cfg)
    assert info["total_params"] + info["mtp_params"] == sum(p.numel() for p in model.parameters())


def test_default_attention_is_mla_and_unchanged():
    """model.attention defaults to mla, and naming it changes nothing: same modules, same weights,
    same outputs (the option only adds a branch)."""
    cfg_default = mha_cfg()
    cfg_default.attention = "mla"
    assert ModelConfig().attention == "mla"
    torch.manual_seed(0)
    a = Transformer(ModelConfig(**{**cfg_default.__dict__}))
    torch.manual_seed(0)
    b = Transformer(cfg_default)
    assert isinstance(a.layers[0].attn, MLA)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert isinstance(new_cache(cfg_default, 1, 4), MLACache)


def test_mha_gradcheck_float64():
    cfg = mha_cfg(num_layers=1, first_k_dense=1, hidden_size=8, num_heads=2, qk_nope_head_dim=2,
                  qk_rope_head_dim=2, v_head_dim=3)
    torch.manual_seed(0)
    attn = MHA(cfg).double()
    from megads.model.rope import RotaryEmbedding

    cos, sin = RotaryEmbedding(cfg)(torch.arange(4), torch.float64)
    x = torch.randn(1, 4, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attn(x, cos, sin), (x,))


def test_mha_has_no_hf_export(tmp_path):
    from megads import hf
    from megads.errors import CheckpointError
    from megads.model.io import save_model

    src = save_model(make(mha_cfg()).float(), tmp_path / "m")
    with pytest.raises(CheckpointError, match="model.attention: mha"):
        hf.megads_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
