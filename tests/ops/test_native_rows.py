"""The CPU decode kernels (megads::linear_rows, megads::expert_swiglu_rows,
megads::latent_attention_rows, megads::rms_norm_rows) against float64 products, softmaxes and
norms written here; where the model takes them; their refusals; under torch.compile."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from plain_loops import run_plain_loops


def _swiglu64(x, offsets, w1, w3, w2):
    """Every expert's SwiGLU on its rows, in float64, one row at a time."""
    out = torch.empty(x.shape[0], w2.shape[1], dtype=torch.float64)
    for e in range(w1.shape[0]):
        for r in range(int(offsets[e]), int(offsets[e + 1])):
            v = x[r].double()
            out[r] = w2[e].double() @ (F.silu(w1[e].double() @ v) * (w3[e].double() @ v))
    return out


@pytest.mark.parametrize("R, K, N", [(1, 512, 192), (3, 37, 70), (4, 16, 33), (7, 130, 9), (16, 200, 64), (0, 8, 4)])
def test_linear_rows_equals_float64_product(native, R, K, N):
    # K not a multiple of 16 or 8 and R not a multiple of 4 exercise the vector tails
    g = torch.Generator().manual_seed(R * 1000 + K)
    x, w = torch.randn(R, K, generator=g), torch.randn(N, K, generator=g)
    y = torch.ops.megads.linear_rows(x, w)
    assert y.shape == (R, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5 * K ** 0.5)
    # non-contiguous inputs are made contiguous
    torch.testing.assert_close(torch.ops.megads.linear_rows(x, w.T.contiguous().T), y)


@pytest.mark.parametrize("counts", [[1, 0, 2, 1], [0, 0, 5, 0], [9, 3, 0, 6], [1, 1, 1, 1]])
def test_expert_swiglu_rows_equals_float64_loop(native, counts):
    E, D, inter = 4, 52, 23  # neither a multiple of 8
    g = torch.Generator().manual_seed(sum(counts))
    w1, w3 = torch.randn(E, inter, D, generator=g), torch.randn(E, inter, D, generator=g)
    w2 = torch.randn(E, D, inter, generator=g)
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), D, generator=g)
    y = torch.ops.megads.expert_swiglu_rows(x, offsets, w1, w3, w2)
    torch.testing.assert_close(y.double(), _swiglu64(x, offsets, w1, w3, w2), rtol=1e-4, atol=1e-4)


def test_expert_swiglu_rows_rollout_shape_and_saturated_silu(native):
    """The tiled path (4 or more rows per expert: 4 x 3 register tiles, their remainders and the
    prefetch of the next tile) at a rollout's ~16 rows per expert, and the vectorised silu where
    its exp saturates (pre-activations of +-hundreds: silu -> 0 and -> x)."""
    E, D, inter = 4, 69, 50
    g = torch.Generator().manual_seed(7)
    w1, w3 = torch.randn(E, inter, D, generator=g), torch.randn(E, inter, D, generator=g)
    w2 = torch.randn(E, D, inter, generator=g)
    offsets = torch.tensor([0, 16, 33, 33, 38])
    for scale in (1.0, 40.0):
        x = torch.randn(38, D, generator=g) * scale
        y = torch.ops.megads.expert_swiglu_rows(x, offsets, w1, w3, w2)
        ref = _swiglu64(x, offsets, w1, w3, w2)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        if scale > 1:
            h = torch.einsum("rd,rid->ri", x.double()[:16], w1[0].double().expand(16, -1, -1))
            assert h.min() < -100 and h.max() > 100  # the saturated ends are exercised


def _latent_attention64(q, joint, key_mask, value_dim, scale):
    """softmax over the kept rows of scale * q . joint, times the rows' first value_dim columns,
    in float64, one (row, head) at a time; no kept row gives zeros."""
    B, H, _ = q.shape
    out = torch.zeros(B, H, value_dim, dtype=torch.float64)
    for b in range(B):
        keep = torch.arange(joint.shape[1]) if key_mask is None else key_mask[b].nonzero().flatten()
        if keep.numel() == 0:
            continue
        rows = joint[b, keep].double()
        for h in range(H):
            p = torch.softmax(scale * (rows @ q[b, h].double()), dim=0)
            out[b, h] = p @ rows[:, :value_dim]
    return out


@pytest.mark.parametrize("B, H, C, V, T", [(1, 8, 160, 128, 300), (3, 3, 37, 30, 17), (2, 5, 72, 64, 129),
                                           (4, 1, 9, 9, 1), (2, 16, 20, 3, 260)])
@pytest.mark.parametrize("masked", [False, True])
def test_latent_attention_rows_equals_float64_softmax(native, B, H, C, V, T, masked):
    # T across chunks (128) and blocks (16) with tails; H not a multiple of 4; C, V not multiples of 8
    g = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, H, C, generator=g)
    cache = torch.randn(B, T + 7, C, generator=g) * 2  # the kernel reads a view of a longer cache
    joint = cache[:, :T]
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=g) > 0.3
        mask[0, : T // 2] = False  # left padding
        if B > 1:
            mask[-1] = False  # a row with no kept key: zeros
    scale = C ** -0.5
    got = torch.ops.megads.latent_attention_rows(q, joint, mask, V, scale)
    assert got.shape == (B, H, V) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _latent_attention64(q, joint, mask, V, scale), rtol=1e-5, atol=1e-5)
    # large scores (a sharp softmax) stay finite and exact
    sharp = torch.ops.megads.latent_attention_rows(q * 30, joint, mask, V, scale)
    torch.testing.assert_close(sharp.double(), _latent_attention64(q * 30, joint, mask, V, scale),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 1, 512), (3, 7), (2, 5, 33), (1, 16), (0, 8), (9,)])
def test_rms_norm_rows_equals_float64_formula(native, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    y = torch.ops.megads.rms_norm_rows(x, w, 1e-6)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    if x.dim() >= 2 and x.shape[0] > 1:  # a non-contiguous input is read correctly
        xt = x.transpose(0, -2).contiguous().transpose(0, -2) if x.dim() > 2 else x.T.contiguous().T
        torch.testing.assert_close(torch.ops.megads.rms_norm_rows(xt, w, 1e-6), y)


@pytest.mark.parametrize("shape", [(4, 1, 512), (3, 7), (2, 5, 33), (130, 24), (1, 16), (0, 8), (9,)])
def test_rms_norm_backward_equals_float64_autograd(native, shape):
    """megads::rms_norm_rows' backward (megads::rms_norm_backward) against autograd through the
    formula in float64; dw summed by fixed blocks of rows: the same bits with 1 and 2 threads."""
    g = torch.Generator().manual_seed(7 + sum(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    dy = torch.randn(*shape, generator=g)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64).backward(dy.double())
    grads = {}
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
            torch.ops.megads.rms_norm_rows(xl, wl, 1e-6).backward(dy)
        finally:
            torch.set_num_threads(prev)
        grads[threads] = (xl.grad, wl.grad)
        assert xl.grad.shape == x.shape and xl.grad.dtype == wl.grad.dtype == torch.float32
        torch.testing.assert_close(xl.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wl.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[1][0], grads[2][0]) and torch.equal(grads[1][1], grads[2][1])
    if x.dim() >= 2 and x.shape[0] > 1:  # non-contiguous x and dy are read correctly
        xt = x.transpose(0, -2).contiguous().transpose(0, -2).requires_grad_()
        wl = w.clone().requires_grad_()
        torch.ops.megads.rms_norm_rows(xt, wl, 1e-6).backward(dy.transpose(0, -2).contiguous().transpose(0, -2))
        torch.testing.assert_close(xt.grad, grads[2][0])
        torch.testing.assert_close(wl.grad, grads[2][1])


def test_rmsnorm_module_takes_the_kernel_in_float32(native, monkeypatch):
    """float32 on CPU with the native ops: the kernel with or without autograd (its gradients
    those of torch's rms_norm); float64 and the torch backend: torch's rms_norm."""
    from megads import ops
    from megads.model.norm import RMSNorm

    calls = []
    real = torch.ops.megads.rms_norm_rows
    monkeypatch.setattr(torch.ops.megads, "rms_norm_rows", lambda *a: calls.append(1) or real(*a), raising=False)
    norm = RMSNorm(24, eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(3, 2, 24)
    dy = torch.randn(3, 2, 24)
    prev = ops.set_backend("native")
    try:
        with torch.no_grad():
            got = norm(x)
            assert len(calls) == 1
            norm(x.double())  # float64: torch's rms_norm
        assert len(calls) == 1
        xg = x.clone().requires_grad_()
        trained = norm(xg)  # autograd: the kernel and its backward
        assert len(calls) == 2 and trained.requires_grad
        trained.backward(dy)
        got_grads = (xg.grad, norm.weight.grad)
        norm.weight.grad = None
        ops.set_backend("torch")
        xt = x.clone().requires_grad_()
        want = norm(xt)
        want.backward(dy)
        assert len(calls) == 2
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(trained.detach(), want.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grads[0], xt.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grads[1], norm.weight.grad, rtol=1e-5, atol=1e-6)
    finally:
        ops.set_backend(prev)


def test_row_kernels_refuse_what_they_cannot_do(native):
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.megads.linear_rows(torch.randn(2, 8, dtype=torch.float64), w.double())
    with pytest.raises(RuntimeError, match=r"x \[R, K\], w \[N, K\]"):
        torch.ops.megads.linear_rows(torch.randn(2, 7), w)
    w1, w2 = torch.randn(2, 3, 8), torch.randn(2, 8, 3)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to N"):
        torch.ops.megads.expert_swiglu_rows(torch.randn(3, 8), torch.tensor([0, 1, 2]), w1, w1, w2)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.megads.expert_swiglu_rows(torch.randn(3, 8), torch.tensor([0, 4, 3]), w1, w1, w2)
    q, joint = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="float32 only"):
            torch.ops.megads.latent_attention_rows(q.double(), joint.double(), None, 4, 1.0)
        with pytest.raises(RuntimeError, match=r"q \[B, H, C\], joint \[B, T, C\]"):
            torch.ops.megads.latent_attention_rows(q, joint[..., :7], None, 4, 1.0)
        with pytest.raises(RuntimeError, match="value_dim"):
            torch.ops.megads.latent_attention_rows(q, joint, None, 9, 1.0)
        with pytest.raises(RuntimeError, match=r"key_mask must be bool \[B, T\]"):
            torch.ops.megads.latent_attention_rows(q, joint, torch.ones(2, 4, dtype=torch.bool), 4, 1.0)
        with pytest.raises(RuntimeError, match=r"key_mask must be bool \[B, T\]"):
            torch.ops.megads.latent_attention_rows(q, joint, torch.ones(2, 5), 4, 1.0)
        with pytest.raises(RuntimeError, match="float32 only"):
            torch.ops.megads.rms_norm_rows(q.double(), torch.ones(8, dtype=torch.float64), 1e-6)
        with pytest.raises(RuntimeError, match=r"x \[\.\.\., D\], w \[D\]"):
            torch.ops.megads.rms_norm_rows(q, torch.ones(7), 1e-6)
        with pytest.raises(RuntimeError, match="float32 only"):
            torch.ops.megads.rms_norm_backward(q.double(), q.double(), torch.ones(8, dtype=torch.float64), 1e-6)
        with pytest.raises(RuntimeError, match=r"dy and x \[\.\.\., D\], w \[D\]"):
            torch.ops.megads.rms_norm_backward(q[:1], q, torch.ones(8), 1e-6)


def test_model_decode_takes_the_row_kernels_only_without_autograd(native, monkeypatch):
    """parallel.tensor.linear and ops.grouped_swiglu call the kernels for float32 CPU inputs of
    few rows without autograd; training and float64 keep the torch products."""
    from megads import ops
    from megads.parallel.tensor import linear

    prev = ops.set_backend("native")
    try:
        calls = []
        for name in ("linear_rows", "expert_swiglu_rows"):
            real = getattr(torch.ops.megads, name)
            monkeypatch.setattr(torch.ops.megads, name,
                                lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a), raising=False)
        x, w = torch.randn(2, 3, 16), torch.randn(5, 16)
        with torch.no_grad():
            torch.testing.assert_close(linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
            assert calls == ["linear_rows"]
            linear(x.double(), w.double())
            linear(torch.randn(25, 16), w)  # more rows than the kernel takes (ROWS_KERNEL = 24)
        linear(x, w.requires_grad_())  # autograd
        assert calls == ["linear_rows"]
        E, D, inter = 3, 16, 8
        w1, w3, w2 = torch.randn(E, inter, D), torch.randn(E, inter, D), torch.randn(E, D, inter)
        offsets = torch.tensor([0, 2, 2, 5])
        xs = torch.randn(5, D)
        with torch.no_grad():
            y = ops.grouped_swiglu(xs, w1, w3, w2, offsets)
        assert calls == ["linear_rows", "expert_swiglu_rows"]
        torch.testing.assert_close(y.double(), _swiglu64(xs, offsets, w1, w3, w2), rtol=1e-4, atol=1e-4)
        ops.grouped_swiglu(xs, w1, w3, w2, offsets)  # autograd on: the grouped products
        assert calls == ["linear_rows", "expert_swiglu_rows"]
        ops.set_backend("torch")  # the torch path never calls the native library
        with torch.no_grad():
            linear(x, w), ops.grouped_swiglu(xs, w1, w3, w2, offsets)
        assert calls == ["linear_rows", "expert_swiglu_rows"]
    finally:
        ops.set_backend(prev)


def test_row_kernels_compile_without_graph_breaks(native):
    from megads import ops
    from megads.parallel.tensor import linear

    prev = ops.set_backend("native")
    try:
        torch._dynamo.reset()
        E, D, inter = 3, 16, 8
        g = torch.Generator().manual_seed(0)
        w, w1, w3 = torch.randn(D, D, generator=g), torch.randn(E, inter, D, generator=g), torch.randn(E, inter, D, generator=g)
        w2 = torch.randn(E, D, inter, generator=g)
        offsets = torch.tensor([0, 2, 2, 5])

        joint, keep = torch.randn(5, 11, D, generator=g), torch.rand(5, 11, generator=g) > 0.2

        def step(x):
            y = ops.grouped_swiglu(linear(x, w), w1, w3, w2, offsets)
            y = torch.ops.megads.rms_norm_rows(y, w[0], 1e-6)
            return torch.ops.megads.latent_attention_rows(y.view(5, 1, D), joint, keep, 8, 0.25)

        x = torch.randn(5, D, generator=g)
        with torch.no_grad():
            want = step(x)
            got = torch.compile(step, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(got, want)
    finally:
        ops.set_backend(prev)


def test_model_decode_attention_takes_the_kernel_only_where_it_applies(native, monkeypatch):
    """A one-token decode step of MLA calls megads::latent_attention_rows for a float32 CPU
    cache without autograd (the default and the fixed-shape step), and its logits equal the
    absorbed torch products'; prefill, autograd, float64 and the torch backend do not call it."""
    from megads import ops
    from megads.config import ModelConfig
    from megads.model.cache import MLACache
    from megads.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_layers=2,
                      first_k_dense=1, num_heads=3, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, n_group=1, topk_group=1, max_seq_len=64, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    calls = []
    real = torch.ops.megads.latent_attention_rows
    monkeypatch.setattr(torch.ops.megads, "latent_attention_rows",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    tokens = torch.randint(1, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # left padding

    def steps(dtype=torch.float32, grad=False):
        m = model.to(dtype)
        cache = MLACache(cfg, 2, 9, dtype=dtype)
        with torch.set_grad_enabled(grad):
            out = [m(tokens[:, :6], cache=cache, attention_mask=mask[:, :6])]
            for t in range(6, 9):
                out.append(m(tokens[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]))
        model.float()
        return torch.cat(out, 1)

    prev = ops.set_backend("native")
    try:
        got = steps()
        assert len(calls) == 3 * cfg.num_layers  # the three one-token steps, not the prefill
        ops.set_backend("torch")
        want = steps()
        ops.set_backend("native")
        assert len(calls) == 3 * cfg.num_layers
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        steps(grad=True), steps(torch.float64)
        assert len(calls) == 3 * cfg.num_layers
        # the fixed-shape step (a tensor position, the mask over the whole cache) takes it too
        cache = MLACache(cfg, 2, 12)
        with torch.no_grad():
            model(tokens[:, :6], cache=cache, attention_mask=mask[:, :6])
            full = torch.zeros(2, 12, dtype=torch.bool)
            full[:, :7] = mask[:, :7]
            pos = torch.full((2, 1), 6)  # as the steps above (positions not given: the cache length)
            step = model(tokens[:, 6:7], cache=cache, positions=pos, attention_mask=full,
                         cache_index=torch.tensor([6]))
        assert len(calls) == 4 * cfg.num_layers
        torch.testing.assert_close(step[:, 0], want[:, 6], rtol=0, atol=1e-5)
    finally:
        ops.set_backend(prev)


@pytest.mark.skipif(os.environ.get("MEGADS_CPU_PLAIN", "0") not in ("", "0"), reason="already the plain loops")
def test_plain_loops_equal_float64_references(native):
    """The kernels' plain loops (CPUs without AVX2+FMA, non-x86 builds), chosen here with
    MEGADS_CPU_PLAIN=1 in a fresh process: this file's float64 comparisons, refusals and model
    equalities run again through them."""
    run_plain_loops(__file__, "equals or refuse or takes", 20)


@pytest.mark.parametrize("counts, padded", [([80, 70, 90, 60], True), ([290, 5, 5, 0], False)])
def test_mid_sized_decode_batches_pad_only_even_routing(counts, padded, monkeypatch):
    """Between PADDED_ROWS, where the native kernel does not apply (bf16, a build without the
    native ops), ops.grouped_swiglu pads every expert to the busiest one's rows for batched
    matmuls, unless that would more than double the rows (an uneven routing): then the grouped
    products. Either way the float64 loop's result."""
    from megads.ops import grouped

    assert grouped.PADDED_ROWS[0] < sum(counts) <= grouped.PADDED_ROWS[1]
    monkeypatch.setattr(grouped, "row_kernels", lambda *tensors: False)
    seen = []
    real = grouped._padded_swiglu
    monkeypatch.setattr(grouped, "_padded_swiglu", lambda *a, **k: seen.append(1) or real(*a, **k))
    E, D, inter = 4, 24, 12
    g = torch.Generator().manual_seed(3)
    w1, w3 = torch.randn(E, inter, D, generator=g), torch.randn(E, inter, D, generator=g)
    w2 = torch.randn(E, D, inter, generator=g)
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), D, generator=g)
    with torch.no_grad():
        y = grouped.grouped_swiglu(x, w1, w3, w2, offsets)
    assert bool(seen) == padded
    torch.testing.assert_close(y.double(), _swiglu64(x, offsets, w1, w3, w2), rtol=1e-4, atol=1e-4)


def test_decode_batches_up_to_512_expert_rows_take_the_kernel(native, monkeypatch):
    """float32 decode batches of up to SWIGLU_ROWS = 512 expert rows (a 128-row rollout, top-4)
    take megads::expert_swiglu_rows (ahead of the padded matmuls there since its register tiles,
    bench/RESULTS.md); 513 rows take the grouped products."""
    from megads import ops
    from megads.ops import grouped

    prev = ops.set_backend("native")
    try:
        calls = []
        real = torch.ops.megads.expert_swiglu_rows
        monkeypatch.setattr(torch.ops.megads, "expert_swiglu_rows", lambda *a: calls.append(1) or real(*a),
                            raising=False)
        E, D, inter = 4, 24, 12
        g = torch.Generator().manual_seed(5)
        w1, w3 = torch.randn(E, inter, D, generator=g), torch.randn(E, inter, D, generator=g)
        w2 = torch.randn(E, D, inter, generator=g)
        for counts, kernel in (([130, 120, 140, 122], True), ([130, 120, 140, 123], False)):
            offsets = torch.tensor([0] + counts).cumsum(0)
            x = torch.randn(int(offsets[-1]), D, generator=g)
            calls.clear()
            with torch.no_grad():
                y = grouped.grouped_swiglu(x, w1, w3, w2, offsets)
            assert bool(calls) == kernel, (sum(counts), calls)
            torch.testing.assert_close(y.double(), _swiglu64(x, offsets, w1, w3, w2), rtol=1e-4, atol=1e-4)
    finally:
        ops.set_backend(prev)
