"""Multi-head Latent Attention: the three attention paths against each other and against a
float64 reference written from the paper's formulas; the latent cache (size, contents,
quantization); left-padded batches; YaRN; gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from megads.config import ModelConfig
from megads.model.cache import MLACache
from megads.model.mla import MLA
from megads.model.rope import RotaryEmbedding
from megads.model.transformer import Transformer


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_layers=2,
                first_k_dense=1, num_heads=3, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, n_group=1, topk_group=1, max_seq_len=64, init_std=0.1)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def make_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).to(dtype).eval()


YARN = dict(rope_scaling="yarn", rope_factor=4.0, original_max_seq_len=4, mscale=1.0, mscale_all_dim=1.0)


# ----------------------------------------------------------------------------- a float64 reference

def ref_rope_angles(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 inverse frequencies of the rope pairs (YaRN written out per pair) -> (cos, sin) [S, r/2]
    of the rotation angles, and the cos/sin scale of the YaRN convention."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv = [base ** (-(2 * i) / d) for i in range(d // 2)]
    if cfg.rope_scaling == "yarn" and cfg.rope_factor > 1:
        def corr(rot):  # pair index whose wavelength makes `rot` turns over the original context
            return d * math.log(cfg.original_max_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(cfg.beta_fast)), 0)
        high = min(math.ceil(corr(cfg.beta_slow)), d - 1)
        if low == high:
            high += 0.001
        new = []
        for i, f in enumerate(inv):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep (extrapolate), 1: interpolate
            new.append(f * (1 - ramp) + f / cfg.rope_factor * ramp)
        inv = new
    ang = positions.double().unsqueeze(-1) * torch.tensor(inv, dtype=torch.float64)
    return ang.cos(), ang.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE written per pair: (x_i, x_{i+d/2}) turned by angle_i. cos/sin [S, d/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    if x.dim() == 4:  # [B, S, H, d]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_mla(mla: MLA, cfg: ModelConfig, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            key_mask=None) -> torch.Tensor:
    """MLA from the paper, float64, with explicit per-head keys/values and a python loop over heads."""
    p = {k: v.double() for k, v in mla.state_dict().items()}
    B, S, _ = x.shape
    H, dn, dr, dv, dc = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = rms(x @ p["wq_a.weight"].T, p["q_norm.weight"], cfg.rms_norm_eps) @ p["wq_b.weight"].T
    else:
        q = x @ p["wq.weight"].T
    q = q.view(B, S, H, dn + dr)
    kv = x @ p["wkv_a.weight"].T
    c_kv = rms(kv[..., :dc], p["kv_norm.weight"], cfg.rms_norm_eps)  # the latent
    k_pe = rotate_pairs(kv[..., dc:], cos, sin)  # ONE rope key per token
    up = (c_kv @ p["wkv_b.weight"].T).view(B, S, H, dn + dv)
    scale = (dn + dr) ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.rope_factor > 1 and cfg.mscale_all_dim:
        m = 0.1 * cfg.mscale_all_dim * math.log(cfg.rope_factor) + 1
        scale *= m * m
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        q_h = torch.cat([q[:, :, h, :dn], rotate_pairs(q[:, :, h, dn:], cos, sin)], -1)  # [B, S, dn+dr]
        k_h = torch.cat([up[:, :, h, :dn], k_pe], -1)  # expanded key of head h
        v_h = up[:, :, h, dn:]
        s = q_h @ k_h.transpose(1, 2) * scale  # [B, S, S]
        allowed = causal.expand(B, S, S)
        if key_mask is not None:
            allowed = allowed & key_mask.bool().unsqueeze(1)
        s = s.masked_fill(~allowed, float("-inf"))
        heads.append(torch.nan_to_num(torch.softmax(s, -1)) @ v_h)
    return torch.cat(heads, -1) @ p["wo.weight"].T


@pytest.mark.parametrize("q_lora", [0, 12])
@pytest.mark.parametrize("yarn", [False, True])
def test_mla_training_path_matches_float64_paper_reference(q_lora, yarn):
    cfg = small_cfg(q_lora_rank=q_lora, **(YARN if yarn else {}))
    torch.manual_seed(1)
    mla = MLA(cfg).double()
    with torch.no_grad():  # non-trivial norm weights
        mla.kv_norm.weight.uniform_(0.5, 1.5)
        if q_lora:
            mla.q_norm.weight.uniform_(0.5, 1.5)
    B, S = 2, 7
    x = torch.randn(B, S, cfg.hidden_size, dtype=torch.float64)
    cos, sin = ref_rope_angles(cfg, torch.arange(S))
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # rotate-half tables
    expected = ref_mla(mla, cfg, x, cos, sin)
    got = mla(x, full_cos, full_sin)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if yarn:  # the softmax scale really carries mscale^2
        m = 0.1 * math.log(4.0) + 1
        assert mla.scale == pytest.approx(12 ** -0.5 * m * m, rel=1e-12)
    # a key mask (left padding) on the training path
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, :3] = False
    expected = ref_mla(mla, cfg, x, cos, sin, key_mask)
    got = mla(x, full_cos, full_sin, attn_mask=key_mask)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("yarn", [False, True])
def test_rotary_tables_match_reference(yarn):
    cfg = small_cfg(qk_rope_head_dim=16, **(YARN if yarn else {}))
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(40)
    cos, sin = rope(pos, torch.float32)
    rc, rs = ref_rope_angles(cfg, pos)
    # mscale == mscale_all_dim: the cos/sin factor is 1 (the temperature sits in the softmax scale)
    torch.testing.assert_close(cos.double(), torch.cat([rc, rc], -1), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin.double(), torch.cat([rs, rs], -1), atol=2e-5, rtol=0)
    # batched positions [B, S] give per-row tables
    pos2 = torch.stack([pos, (pos - 5).clamp_min(0)])
    c2, s2 = rope(pos2, torch.float32)
    assert c2.shape == (2, 40, 16)
    torch.testing.assert_close(c2[1, 5:], cos[:35])
    if yarn:  # YaRN changes the low frequencies only: the first pair rotates as before
        plain = RotaryEmbedding(small_cfg(qk_rope_head_dim=16))
        assert rope.inv_freq[0] == pytest.approx(plain.inv_freq[0].item())
        assert rope.inv_freq[-1] == pytest.approx(plain.inv_freq[-1].item() / 4, rel=1e-5)


@pytest.mark.parametrize("m, m_all", [(1.0, 1.0), (0.707, 0.707), (1.0, 0.0), (0.707, 0.0), (1.0, 0.5)])
def test_yarn_cos_sin_factor_follows_the_mscale_ratio(m, m_all):
    """HF convention: cos/sin scaled by mscale(f, mscale) / mscale(f, mscale_all_dim), the softmax
    scale by mscale(f, mscale_all_dim)^2 (no factor when mscale_all_dim is 0)."""
    cfg = small_cfg(rope_scaling="yarn", rope_factor=40.0, original_max_seq_len=8, mscale=m, mscale_all_dim=m_all)

    def ms(f, x):
        return 0.1 * x * math.log(f) + 1

    rope = RotaryEmbedding(cfg)
    assert rope.attention_factor == pytest.approx(ms(40, m) / ms(40, m_all))
    mla = MLA(cfg)
    assert mla.scale == pytest.approx(12 ** -0.5 * (ms(40, m_all) ** 2 if m_all else 1.0))


# ----------------------------------------------------------------------------- decode == full forward

def decode_logits(model, tokens, prefix, **cache_kw):
    """Prefill `prefix` tokens into a fresh cache, then decode one token at a time; logits [B, S, V]."""
    B, S = tokens.shape
    naive = cache_kw.pop("naive", False)
    cache = MLACache(model.cfg, B, S, **cache_kw)
    out = [model(tokens[:, :prefix], cache=cache, naive=naive)]
    for t in range(prefix, S):
        out.append(model(tokens[:, t:t + 1], cache=cache, naive=naive))
    assert cache.length == S
    return torch.cat(out, 1)


@pytest.mark.parametrize("q_lora", [0, 12])
@pytest.mark.parametrize("yarn", [False, True])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_absorbed_and_naive_decode_equal_full_forward(q_lora, yarn, backend):
    """backend native: one-token steps through megads::latent_attention_rows (where the library
    is built); torch: the absorbed batched products."""
    from megads import ops

    if backend == "native":
        pytest.importorskip("megads._C", reason="native ops not built")
    cfg = small_cfg(q_lora_rank=q_lora, **(YARN if yarn else {}))
    model = make_model(cfg)
    B, S = 2, 11  # with YaRN: past original_max_seq_len (4)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    prev = ops.set_backend(backend)
    try:
        with torch.no_grad():
            full = model(tokens)
            absorbed = decode_logits(model, tokens, prefix=4)
            naive = decode_logits(model, tokens, prefix=4, naive=True)
            one_by_one = decode_logits(model, tokens, prefix=1)
    finally:
        ops.set_backend(prev)
    assert full.shape == (B, S, cfg.vocab_size)
    torch.testing.assert_close(absorbed, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(naive, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=0)


def test_cache_naive_flag_selects_the_naive_path(monkeypatch):
    """MLACache(naive=True) alone (as its docstring says) makes attention expand the cache."""
    cfg = small_cfg()
    model = make_model(cfg)
    calls = {"naive": 0, "absorbed": 0}
    orig_naive, orig_abs = MLA._attend_naive, MLA._attend_absorbed

    def naive(self, *a):
        calls["naive"] += 1
        return orig_naive(self, *a)

    def absorbed(self, *a):
        calls["absorbed"] += 1
        return orig_abs(self, *a)

    def rows(self, *a):  # the native decode-attention kernel: absorbed too, where it applies
        out = orig_rows(self, *a)
        calls["absorbed"] += out is not None
        return out

    orig_rows = MLA._attend_rows
    monkeypatch.setattr(MLA, "_attend_naive", naive)
    monkeypatch.setattr(MLA, "_attend_absorbed", absorbed)
    monkeypatch.setattr(MLA, "_attend_rows", rows)
    tokens = torch.randint(0, cfg.vocab_size, (1, 4))
    with torch.no_grad():
        model(tokens, cache=MLACache(cfg, 1, 4, naive=True))
    assert calls == {"naive": cfg.num_layers, "absorbed": 0}
    with torch.no_grad():  # a prompt prefill runs fused SDPA; the decode step runs absorbed
        cache = MLACache(cfg, 1, 5)
        model(tokens, cache=cache)
        assert calls == {"naive": cfg.num_layers, "absorbed": 0}
        model(tokens[:, :1], cache=cache)
    assert calls == {"naive": cfg.num_layers, "absorbed": cfg.num_layers}


# ----------------------------------------------------------------------------- left padding

def test_left_padded_rows_match_the_prompt_alone():
    cfg = small_cfg(q_lora_rank=12)
    model = make_model(cfg, seed=2)
    g = torch.Generator().manual_seed(5)
    long = torch.randint(1, cfg.vocab_size, (7,), generator=g)
    short = torch.randint(1, cfg.vocab_size, (4,), generator=g)
    pad = 0
    batch = torch.stack([long, torch.cat([torch.full((3,), pad), short])])
    mask = batch != pad
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone_long, alone_short = model(long[None]), model(short[None])
        # training path with a key mask and per-row positions
        both = model(batch, positions=positions, attention_mask=mask)
        torch.testing.assert_close(both[0], alone_long[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1, 3:], alone_short[0], atol=1e-5, rtol=0)
        # cached path: prefill the padded batch, then decode
        cache = MLACache(cfg, 2, 9)
        pre = model(batch[:, :5], positions=positions[:, :5], cache=cache, attention_mask=mask[:, :5])
        torch.testing.assert_close(pre[1, 3:], alone_short[0, :2], atol=1e-5, rtol=0)
        nxt = torch.tensor([[long[5]], [short[2]]])
        step = model(nxt, positions=positions[:, 5:6], cache=cache, attention_mask=mask[:, :6])
        torch.testing.assert_close(step[:, 0], torch.stack([alone_long[0, 5], alone_short[0, 2]]), atol=1e-5, rtol=0)

        # generation: the same tokens as each prompt alone, with the mask given or derived from pad
        N = 6
        out_mask = model.generate(batch, max_new_tokens=N, attention_mask=mask)
        out_pad = model.generate(batch, max_new_tokens=N, pad_token_id=pad)
        gen_long = model.generate(long[None], max_new_tokens=N)
        gen_short = model.generate(short[None], max_new_tokens=N)
    assert out_mask.shape == (2, 7 + N)
    assert torch.equal(out_mask, out_pad)
    assert torch.equal(out_mask[0], gen_long[0])
    assert torch.equal(out_mask[1, 3:], gen_short[0])
    assert torch.equal(out_mask[:, :7], batch)


# ----------------------------------------------------------------------------- the cache itself

def _cache_tensors(cache: MLACache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        out += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    out += [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_are_latent_plus_rope_key(dtype, size):
    cfg = small_cfg()
    model = make_model(cfg, dtype=dtype)
    B, L = 2, 10
    cache = MLACache(cfg, B, L, dtype=dtype)
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    assert cache.bytes_per_token_per_layer() == per_layer
    assert cache.bytes_per_token() == per_layer * cfg.num_layers
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (B, 6)), cache=cache)
        model(torch.randint(0, cfg.vocab_size, (B, 1)), cache=cache)
    assert len(cache.layers) == cfg.num_layers
    tensors = _cache_tensors(cache)
    # only the latent and the single rope key: never per-head keys/values (each layer keeps
    # them in one buffer [B, L, kv_lora + rope], of which `kv` and `pe` are views)
    views = sorted(tuple(t.shape) for layer in cache.layers for t in (layer.kv, layer.pe))
    assert views == sorted([(B, L, cfg.kv_lora_rank), (B, L, cfg.qk_rope_head_dim)] * cfg.num_layers)
    assert all(t.dtype == dtype for t in tensors)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert len(storages) == cfg.num_layers  # one allocation per layer, nothing else held
    assert sum(storages.values()) == B * L * cache.bytes_per_token()
    # the cache holds the normalised latent that the layer computed
    layer0 = model.layers[0]
    h = model.embed(torch.zeros(1, 1, dtype=torch.long))
    kv = layer0.attn.wkv_a(layer0.attn_norm(h))
    c_kv = layer0.attn.kv_norm(kv[..., :cfg.kv_lora_rank])
    cache2 = MLACache(cfg, 1, 1, dtype=dtype)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache2)
    torch.testing.assert_close(cache2.layers[0].kv[0, 0].float(), c_kv[0, 0].detach().float())


def test_cache_overflow_is_an_error():
    cfg = small_cfg()
    model = make_model(cfg)
    cache = MLACache(cfg, 1, 3)
    with pytest.raises((ValueError, RuntimeError)):
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("quant, max_rel, mean_rel", [("int8", 0.05, 0.01), ("float8", 0.15, 0.03)])
def test_quantized_cache_error_is_small(quant, max_rel, mean_rel):
    """Logits with a quantized latent vs the float cache. A dense model: in an MoE model a tiny
    perturbation may flip one token's expert choice, a discrete jump unrelated to the cache.
    float8 e4m3 keeps 3 mantissa bits (~2% rms error per latent value), int8 ~0.5%."""
    if quant == "float8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    cfg = small_cfg(q_lora_rank=12, n_routed_experts=0)
    model = make_model(cfg, seed=4)
    B, S = 2, 12
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = decode_logits(model, tokens, prefix=5)
        got = decode_logits(model, tokens, prefix=5, quant=quant)
    diff, std = (got - ref).abs(), ref.std().item()
    rel_max, rel_mean = diff.max().item() / std, diff.mean().item() / std
    print(f"{quant} cache: logits error max {rel_max:.2%}, mean {rel_mean:.3%} of the logits' std {std:.3f}")
    assert 0 < rel_max < max_rel and rel_mean < mean_rel
    # the latent round trip itself
    latent = torch.randn(2, 50, cfg.kv_lora_rank, generator=torch.Generator().manual_seed(0)) * 3
    layer = MLACache(cfg, 2, 50, quant=quant).layers[0]
    layer.write(0, latent, torch.zeros(2, 50, cfg.qk_rope_head_dim))
    back, _ = layer.read(50)
    rt = ((back - latent).norm() / latent.norm()).item()
    print(f"{quant} cache: latent round-trip rms error {rt:.3%}")
    assert rt < (0.01 if quant == "int8" else 0.04)
    # bytes: the latent in 1 byte + a float32 per-token scale + the rope key in the cache dtype
    q, f32 = MLACache(cfg, B, S, quant=quant), MLACache(cfg, B, S)
    assert q.bytes_per_token_per_layer() == cfg.kv_lora_rank + 4 + 4 * cfg.qk_rope_head_dim
    assert q.bytes_per_token() < f32.bytes_per_token()
    assert (MLACache(cfg, B, S, dtype=torch.bfloat16, quant=quant).bytes_per_token()
            < MLACache(cfg, B, S, dtype=torch.bfloat16).bytes_per_token())
    assert all(layer.kv.element_size() == 1 for layer in q.layers)
    # through generate(): same shape, prompt kept, (nearly) the same greedy tokens
    with torch.no_grad():
        a = model.generate(tokens[:, :6], max_new_tokens=5)
        b = model.generate(tokens[:, :6], max_new_tokens=5, cache_quant=quant)
    assert b.shape == a.shape and torch.equal(b[:, :6], tokens[:, :6])
    assert (a == b).float().mean() > 0.8


def test_unknown_cache_quant_is_rejected():
    with pytest.raises(ValueError):
        MLACache(small_cfg(), 1, 4, quant="int4")


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("q_lora", [0, 6])
def test_mla_gradcheck_float64(q_lora):
    cfg = small_cfg(hidden_size=16, num_heads=2, q_lora_rank=q_lora, kv_lora_rank=8, qk_nope_head_dim=4,
                    qk_rope_head_dim=4, v_head_dim=4, init_std=0.3, **YARN)
    torch.manual_seed(7)
    mla = MLA(cfg).double()
    names = [n for n, _ in mla.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in mla.named_parameters()]
    x = torch.randn(1, 3, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(3), torch.float64)

    def f(x, *ps):
        return functional_call(mla, dict(zip(names, ps)), (x, cos, sin))

    # every element of the input; all weights through random projections (fast mode: cheap on 2 cores)
    assert torch.autograd.gradcheck(lambda x: f(x, *params), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_decode_row_linear_equals_f_linear():
    """parallel.tensor.linear's W @ x^T form for decode-sized inputs (up to 32 rows, up to 128
    without autograd) is x W^T: checked in float64 at each size, with its gradient."""
    from megads.parallel.tensor import linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, dtype=torch.float64, generator=g)
    for rows in (1, 32, 64, 128, 200):
        x = torch.randn(rows // 4 or 1, 4 if rows >= 4 else rows, 16, dtype=torch.float64, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(linear(x, w), x @ w.T, rtol=1e-12, atol=1e-12)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        linear(xg, wg).square().sum().backward()
        x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
        (x2 @ w2.T).square().sum().backward()
        torch.testing.assert_close(xg.grad, x2.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(wg.grad, w2.grad, rtol=1e-12, atol=1e-12)
