"""The CPU few-row decode kernels (megads::linear_rows, megads::expert_swiglu_rows) against float64
products written here; where the model takes them; their refusals; under torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


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
            linear(torch.randn(17, 16), w)  # more rows than the kernel takes
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

        def step(x):
            return ops.grouped_swiglu(linear(x, w), w1, w3, w2, offsets)

        x = torch.randn(5, D, generator=g)
        with torch.no_grad():
            want = step(x)
            got = torch.compile(step, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(got, want)
    finally:
        ops.set_backend(prev)
