"""The CPU training attention kernel (megads::causal_attention and its backward) against a float64
softmax written here, row by row; its autograd registration (gradcheck), refusals, compile
tracing; where the model takes it and that the model then equals SDPA's path."""
from __future__ import annotations

import math
import os

import pytest
import torch

from plain_loops import run_plain_loops



def _reference(q, k, v, scale, keep=None):
    """o [B, Sq, H, Dv] and lse [B, H, Sq] one query row at a time, float64: row i's softmax over
    the kept keys among 0..Sk - Sq + i (a row with none: o 0, lse -inf)."""
    B, Sq, H, _ = q.shape
    off = k.shape[1] - Sq
    o = torch.zeros(B, Sq, H, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for i in range(Sq):
            js = [j for j in range(off + i + 1) if keep is None or keep[b, j]]
            if not js:
                continue
            for h in range(H):
                s = (k[b, js, h].double() @ q[b, i, h].double()) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                o[b, i, h] = torch.exp(s - lse[b, h, i]) @ v[b, js, h].double()
    return o, lse


def _dense(q, k, v, scale, keep=None):
    """The same through one dense masked softmax (autograd's gradients: a different formula)."""
    Sq, Sk = q.shape[1], k.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~mask, float("-inf")), -1))
    return torch.einsum("bhij,bjhd->bihd", p, v)


def _inputs(B, S, H, Dq, Dv, dtype, seed, views=True, Sk=None):
    """q [B, S], k, v [B, Sk] as the model passes them: views of wider tensors (last dim
    contiguous, the row stride larger than H * D), unless views=False."""
    g = torch.Generator().manual_seed(seed)
    Sk = S if Sk is None else Sk
    if not views:
        return [torch.randn(B, n, H, d, generator=g, dtype=dtype) for n, d in ((S, Dq), (Sk, Dq), (Sk, Dv))]
    wide = torch.randn(B, Sk, H, 2 * Dq + Dv + 3, generator=g, dtype=dtype)
    return wide[:, Sk - S:, :, :Dq], wide[..., Dq + 1: 2 * Dq + 1], wide[..., 2 * Dq + 2: 2 * Dq + 2 + Dv]


def _keep(B, Sk, seed, holes=True):
    """Left padding of a different length per row (row 0 none), and random dropped keys."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(B, Sk, dtype=torch.bool)
    for b in range(1, B):
        keep[b, : int(torch.randint(1, Sk, (1,), generator=g))] = False
    if holes:
        keep &= torch.rand(B, Sk, generator=g) > 0.2
    return keep


# S around the 64-row block (one block, an exact multiple, a partial last block); Dv != Dq;
# Sk > S (the queries the last S positions)
SHAPES = [(1, 1, 1, 4, 4, 1), (2, 5, 3, 8, 4, 5), (1, 64, 2, 16, 16, 64), (2, 65, 2, 12, 20, 65),
          (2, 130, 3, 24, 16, 130), (1, 200, 2, 96, 64, 200), (2, 3, 2, 8, 6, 40), (2, 70, 2, 8, 8, 150)]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
@pytest.mark.parametrize("B, S, H, Dq, Dv, Sk", SHAPES)
def test_forward_and_backward_equal_float64_rows(native, B, S, H, Dq, Dv, Sk, masked):
    q, k, v = (t.requires_grad_() for t in
               (x.detach().clone() for x in _inputs(B, S, H, Dq, Dv, torch.float64, S * 7 + Dv, Sk=Sk)))
    keep = _keep(B, Sk, S) if masked else None
    scale = 1.0 / math.sqrt(Dq) * 1.3
    o, lse = torch.ops.megads.causal_attention(q, k, v, keep, scale)
    o_ref, lse_ref = _reference(q.detach(), k.detach(), v.detach(), scale, keep)
    assert o.shape == (B, S, H, Dv) and lse.shape == (B, H, S)
    torch.testing.assert_close(o.detach(), o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)
    if masked and B > 1 and S == Sk:
        assert bool(torch.isinf(lse).any())  # some rows see no kept key

    g = torch.randn(B, S, H, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(o, (q, k, v), g)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _dense(qr, kr, vr, scale, keep)
    torch.testing.assert_close(ref.detach(), o_ref, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(ref, (qr, kr, vr), g)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.is_contiguous(), name
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("B, S, H, Sk, masked", [(1, 200, 1, 200, False), (1, 200, 1, 260, True),
                                                 (1, 330, 2, 330, True), (2, 129, 1, 129, False)])
def test_fewer_sequences_and_heads_than_threads(native, threads, B, S, H, Sk, masked):
    """With fewer (batch, head) pairs than threads the kernel splits each pair's query blocks over
    tasks (the backward then sums dK/dV over per-task buffers): the same float64 references hold
    at every thread count, and float32 results agree with the one-thread run."""
    keep = _keep(B, Sk, 5) if masked else None
    before = torch.get_num_threads()
    try:
        results = {}
        for n in (1, threads):
            torch.set_num_threads(n)
            for dtype in (torch.float64, torch.float32):
                q, k, v = (x.detach().clone().requires_grad_() for x in _inputs(B, S, H, 24, 16, dtype, 9, Sk=Sk))
                o, lse = torch.ops.megads.causal_attention(q, k, v, keep, 0.3)
                g = torch.randn(B, S, H, 16, dtype=dtype, generator=torch.Generator().manual_seed(2))
                results[n, dtype] = (o, lse, *torch.autograd.grad(o, (q, k, v), g))
                if dtype == torch.float64 and n == threads:
                    o_ref, lse_ref = _reference(q.detach(), k.detach(), v.detach(), 0.3, keep)
                    torch.testing.assert_close(o.detach(), o_ref, rtol=1e-12, atol=1e-12)
                    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)
                    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    want = torch.autograd.grad(_dense(qr, kr, vr, 0.3, keep), (qr, kr, vr), g)
                    for name, a, b in zip("qkv", results[n, dtype][2:], want):
                        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)
    finally:
        torch.set_num_threads(before)
    one, many = results[1, torch.float32], results[threads, torch.float32]
    torch.testing.assert_close(many[0], one[0], rtol=0, atol=0)  # forward: the same arithmetic per row
    torch.testing.assert_close(many[1], one[1], rtol=0, atol=0)
    for name, a, b in zip("qkv", many[2:], one[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_expanded_and_transposed_operands_equal_contiguous_ones(native):
    """Operands BLAS cannot read as rows (stride 0 along S, D not unit-stride) are copied first."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 1, 3, 8, generator=g, dtype=torch.float64).expand(2, 6, 3, 8)  # stride 0 along S
    k = torch.randn(2, 6, 3, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64)
    v_t = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # D not unit-stride
    o, lse = torch.ops.megads.causal_attention(q, k, v_t, None, 0.5)
    o_ref, lse_ref = _reference(q, k, v, 0.5)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)


def test_float32_close_to_float64(native):
    for keep in (None, _keep(2, 150, 4)):
        q, k, v = _inputs(2, 150, 4, 96, 64, torch.float32, 11, views=False)
        o, lse = torch.ops.megads.causal_attention(q, k, v, keep, 96 ** -0.5)
        o_ref, lse_ref = _reference(q, k, v, 96 ** -0.5, keep)
        assert o.dtype == lse.dtype == torch.float32
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("Sk, masked", [(7, False), (9, True)])
def test_gradcheck(native, Sk, masked):
    q, k, v = (t.detach().clone().requires_grad_() for t in _inputs(2, 7, 2, 3, 5, torch.float64, 5, Sk=Sk))
    keep = _keep(2, Sk, 1) if masked else None
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.megads.causal_attention(a, b, c, keep, 0.7)[0],
                                    (q, k, v))


def test_refusals(native):
    q, k, v = _inputs(1, 4, 2, 8, 8, torch.float32, 0, views=False)
    op = torch.ops.megads.causal_attention
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(q, k.double(), v, None, 1.0)
    shapes = r"q \[B, Sq, H, Dq\], k \[B, Sk, H, Dq\], v \[B, Sk, H, Dv\] with Sq <= Sk"
    with pytest.raises(RuntimeError, match=shapes):
        op(q, k[:, :3], v[:, :3], None, 1.0)  # more queries than keys
    with pytest.raises(RuntimeError, match=shapes):
        op(q, k, v[:, :3], None, 1.0)
    with pytest.raises(RuntimeError, match=shapes):
        op(q[0], k[0], v[0], None, 1.0)
    with pytest.raises(RuntimeError, match=r"key_mask must be bool \[B, Sk\]"):
        op(q, k, v, torch.ones(1, 4), 1.0)
    with pytest.raises(RuntimeError, match=r"key_mask must be bool \[B, Sk\]"):
        op(q, k, v, torch.ones(1, 5, dtype=torch.bool), 1.0)


def test_compiles_without_graph_breaks(native):
    torch._dynamo.reset()
    q, k, v = (t.detach().clone().requires_grad_() for t in _inputs(2, 70, 2, 8, 6, torch.float32, 2, Sk=90))
    keep = _keep(2, 90, 3)

    def f(q, k, v):
        return (torch.ops.megads.causal_attention(q * 1.5, k, v, keep, 0.3)[0] ** 2).sum()

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


def _spy(monkeypatch):
    calls = []
    real = torch.ops.megads.causal_attention

    def spy(q, k, v, keep, scale):
        calls.append((q.dtype, keep is not None))
        return real(q, k, v, keep, scale)

    monkeypatch.setattr(torch.ops.megads, "causal_attention", spy)
    return calls


def _loss_and_grads(model, x, mask=None):
    """Loss and every gradient of one training forward+backward: the LM and MTP losses, or with a
    key mask of left-padded rows (the GRPO log-prob pass's form) the per-token losses summed over
    kept tokens plus the balance term."""
    model.zero_grad(set_to_none=True)
    if mask is None:
        out = model(x[:, :-1], labels=x[:, 1:])
        loss = out.loss + out.mtp_loss
    else:
        out = model(x[:, :-1], labels=torch.where(mask.bool(), x[:, 1:], -100), attention_mask=mask,
                    token_losses=True)
        loss = (out.token_losses * mask).sum() + out.loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["mla", "mha"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "left-padded"])
def test_model_takes_the_kernel_and_equals_sdpa(native, monkeypatch, attention, masked):
    """A training forward+backward of MLA (and the MHA baseline), with and without a key mask of
    left-padded rows, calls the kernel on float64 CPU tensors, and its loss and every gradient
    equal those of SDPA's path (MEGADS_ATTENTION=sdpa) in float64."""
    from megads import ops

    prev = ops.set_backend("native")
    try:
        model, cfg = _mla_model(torch.float64, attention)
        x = torch.randint(0, cfg.vocab_size, (3, 70), generator=torch.Generator().manual_seed(1))
        mask = None
        if masked:
            mask = torch.ones(3, 69, dtype=torch.long)
            mask[1, :9], mask[2, :30] = 0, 0
        calls = _spy(monkeypatch)
        l1, g1 = _loss_and_grads(model, x, mask)
        n = 2 if masked else 3  # the layers (+ the MTP block, which token losses skip)
        assert calls == [(torch.float64, masked)] * n
        monkeypatch.setenv("MEGADS_ATTENTION", "sdpa")
        l2, g2 = _loss_and_grads(model, x, mask)
        assert len(calls) == n
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
        assert g1.keys() == g2.keys()
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12, msg=n)
    finally:
        ops.set_backend(prev)


def test_model_skips_the_kernel_where_it_does_not_apply(native, monkeypatch):
    """With packed documents (a full mask), in bfloat16, on the torch backend or with
    MEGADS_ATTENTION=sdpa, SDPA runs; another MEGADS_ATTENTION value is refused by name."""
    from megads import ops

    calls = _spy(monkeypatch)
    prev = ops.set_backend("native")
    try:
        model, cfg = _mla_model(torch.float32)
        x = torch.randint(0, cfg.vocab_size, (2, 20))
        model(x, labels=x, doc_ids=torch.tensor([[0] * 8 + [1] * 12, [0] * 20]))
        assert calls == []
        model.to(torch.bfloat16)(x)
        assert calls == []
        model.float()
        ops.set_backend("torch")
        model(x)
        assert calls == []
        ops.set_backend("native")
        model(x)
        assert calls == [(torch.float32, False)] * 2
        model(x, attention_mask=torch.ones_like(x))
        assert calls[2:] == [(torch.float32, True)] * 2
        monkeypatch.setenv("MEGADS_ATTENTION", "sdpa")
        model(x)
        assert len(calls) == 4
        monkeypatch.setenv("MEGADS_ATTENTION", "flash")
        with pytest.raises(ValueError, match="MEGADS_ATTENTION must be 'auto' or 'sdpa', got 'flash'"):
            model(x)
    finally:
        ops.set_backend(prev)


@pytest.mark.skipif(os.environ.get("MEGADS_CPU_PLAIN", "0") not in ("", "0"), reason="already the plain loops")
def test_plain_loops_equal_float64_references(native):
    """The plain softmax loops and the at::mm products (CPUs without AVX2, torch builds without a
    BLAS), chosen with MEGADS_CPU_PLAIN=1 in a fresh process: this file's comparisons again."""
    run_plain_loops(__file__, "equal or close or gradcheck", 9)
