"""The CPU training attention kernel (megads::causal_attention and its backward) against a float64
softmax written here, row by row; its autograd registration (gradcheck), refusals, compile
tracing; where the model takes it and that the model then equals SDPA's path."""
from __future__ import annotations

import math
import os

import pytest
import torch

from plain_loops import run_plain_loops



def _reference(q, k, v, scale):
    """o [B, S, H, Dv] and lse [B, H, S] one query row at a time, float64: row i's softmax over
    keys 0..i."""
    B, S, H, _ = q.shape
    o = torch.zeros(B, S, H, v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(B, H, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                s = (k[b, : i + 1, h].double() @ q[b, i, h].double()) * scale  # [i + 1]
                lse[b, h, i] = torch.logsumexp(s, 0)
                o[b, i, h] = torch.exp(s - lse[b, h, i]) @ v[b, : i + 1, h].double()
    return o, lse


def _inputs(B, S, H, Dq, Dv, dtype, seed, views=True):
    """q, k, v as the model passes them: views of wider tensors (last dim contiguous, the row
    stride larger than H * D), unless views=False."""
    g = torch.Generator().manual_seed(seed)
    if not views:
        return [torch.randn(B, S, H, d, generator=g, dtype=dtype) for d in (Dq, Dq, Dv)]
    wide = torch.randn(B, S, H, 2 * Dq + Dv + 3, generator=g, dtype=dtype)
    return wide[..., :Dq], wide[..., Dq + 1: 2 * Dq + 1], wide[..., 2 * Dq + 2: 2 * Dq + 2 + Dv]


# S around the 64-row block (one block, an exact multiple, a partial last block); Dv != Dq
SHAPES = [(1, 1, 1, 4, 4), (2, 5, 3, 8, 4), (1, 64, 2, 16, 16), (2, 65, 2, 12, 20), (2, 130, 3, 24, 16),
          (1, 200, 2, 96, 64)]


@pytest.mark.parametrize("B, S, H, Dq, Dv", SHAPES)
def test_forward_and_backward_equal_float64_rows(native, B, S, H, Dq, Dv):
    q, k, v = (t.requires_grad_() for t in
               (x.detach().clone() for x in _inputs(B, S, H, Dq, Dv, torch.float64, S * 7 + Dv)))
    scale = 1.0 / math.sqrt(Dq) * 1.3
    o, lse = torch.ops.megads.causal_attention(q, k, v, scale)
    o_ref, lse_ref = _reference(q.detach(), k.detach(), v.detach(), scale)
    assert o.shape == (B, S, H, Dv) and lse.shape == (B, H, S)
    torch.testing.assert_close(o.detach(), o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)

    g = torch.randn(B, S, H, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(o, (q, k, v), g)
    # the reference's gradients: autograd through a dense masked softmax (a different formula)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) * scale
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), vr)
    torch.testing.assert_close(ref.detach(), o_ref, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(ref, (qr, kr, vr), g)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.is_contiguous(), name
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


def test_float32_close_to_float64(native):
    q, k, v = _inputs(2, 150, 4, 96, 64, torch.float32, 11, views=False)
    o, lse = torch.ops.megads.causal_attention(q, k, v, 96 ** -0.5)
    o_ref, lse_ref = _reference(q, k, v, 96 ** -0.5)
    assert o.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=2e-6)


def test_gradcheck(native):
    q, k, v = (t.detach().clone().requires_grad_() for t in _inputs(1, 7, 2, 3, 5, torch.float64, 5))
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.megads.causal_attention(a, b, c, 0.7)[0], (q, k, v))


def test_refusals(native):
    q, k, v = _inputs(1, 4, 2, 8, 8, torch.float32, 0, views=False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.megads.causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.megads.causal_attention(q, k.double(), v, 1.0)
    with pytest.raises(RuntimeError, match=r"q, k \[B, S, H, Dq\]"):
        torch.ops.megads.causal_attention(q, k[:, :3], v, 1.0)
    with pytest.raises(RuntimeError, match=r"q, k \[B, S, H, Dq\]"):
        torch.ops.megads.causal_attention(q[0], k[0], v[0], 1.0)


def test_compiles_without_graph_breaks(native):
    torch._dynamo.reset()
    q, k, v = (t.detach().clone().requires_grad_() for t in _inputs(2, 70, 2, 8, 6, torch.float32, 2))

    def f(q, k, v):
        return (torch.ops.megads.causal_attention(q * 1.5, k, v, 0.3)[0] ** 2).sum()

    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    e = torch._dynamo.explain(f)(q, k, v)
    assert (e.graph_count, e.graph_break_count) == (1, 0)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _mla_model(dtype, attention="mla"):
    from megads.config import ModelConfig
    from megads.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_layers=2,
                      first_k_dense=1, num_heads=4, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                      topk_group=1, mtp_depth=1, max_seq_len=128, attention=attention)
    torch.manual_seed(0)
    return Transformer(cfg).to(dtype), cfg


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_model_takes_the_kernel_and_equals_sdpa(native, monkeypatch, attention):
    """A training forward+backward of MLA (and the MHA baseline) without a key mask calls the
    kernel on float64/float32 CPU tensors, and its loss and every gradient equal those of SDPA's
    path (the kernel turned off) in float64."""
    import megads.model.mla as mla
    from megads import ops

    prev = ops.set_backend("native")
    calls = []
    real = torch.ops.megads.causal_attention

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].dtype)
            return real(*a)

    try:
        model, cfg = _mla_model(torch.float64, attention)
        x = torch.randint(0, cfg.vocab_size, (3, 70), generator=torch.Generator().manual_seed(1))
        results = []
        for use in (True, False):
            if not use:
                monkeypatch.setattr(mla, "native_causal", lambda q, key_mask: False)
            monkeypatch.setattr(torch.ops.megads, "causal_attention", Spy())
            model.zero_grad(set_to_none=True)
            out = model(x[:, :-1], labels=x[:, 1:])
            (out.loss + out.mtp_loss).backward()
            results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
            if use:
                assert calls == [torch.float64] * 3  # 2 layers + the MTP block
            else:
                assert len(calls) == 3
        (l1, g1), (l2, g2) = results
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
        assert g1.keys() == g2.keys()
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12, msg=n)
    finally:
        ops.set_backend(prev)


def test_model_skips_the_kernel_where_it_does_not_apply(native, monkeypatch):
    """With a key mask (padded rows), in bfloat16, or on the torch backend, SDPA runs."""
    from megads import ops

    calls = []
    real = torch.ops.megads.causal_attention
    monkeypatch.setattr(torch.ops.megads, "causal_attention", lambda *a: calls.append(1) or real(*a))
    prev = ops.set_backend("native")
    try:
        model, cfg = _mla_model(torch.float32)
        x = torch.randint(0, cfg.vocab_size, (2, 20))
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[0, :5] = 0
        model(x, attention_mask=mask)
        assert calls == []
        model.to(torch.bfloat16)(x)
        assert calls == []
        model.float()
        ops.set_backend("torch")
        model(x)
        assert calls == []
        ops.set_backend("native")
        model(x)
        assert len(calls) == 2
    finally:
        ops.set_backend(prev)


@pytest.mark.skipif(os.environ.get("MEGADS_CPU_PLAIN", "0") not in ("", "0"), reason="already the plain loops")
def test_plain_loops_equal_float64_references(native):
    """The plain softmax loops and the at::mm products (CPUs without AVX2, torch builds without a
    BLAS), chosen with MEGADS_CPU_PLAIN=1 in a fresh process: this file's comparisons again."""
    run_plain_loops(__file__, "equal or close or gradcheck", 9)
