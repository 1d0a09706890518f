"""Cross entropy's CPU row kernel (megads::softmax_rows_: in place exp(x - row max), the row sums,
the target's logit) against float64 formulas written here; non-finite rows as torch has them; the
model's loss path taking it, against F.cross_entropy and against the torch path."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from plain_loops import run_plain_loops


def _logits(N, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[[1, 4]] = torch.tensor([-1, V])  # outside the vocabulary: no target logit
    return x, t


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("V", [1, 7, 8, 101, 16384 + 5])
def test_rows_equal_float64_formulas(native, dtype, tol, V):
    x, t = _logits(9, V, dtype)
    want_max = x.double().amax(-1)
    want_exp = torch.exp(x.double() - want_max[:, None])
    want_pick = torch.where((t >= 0) & (t < V), x.double().gather(-1, t.clamp(0, V - 1)[:, None])[:, 0], 0.0)
    buf = x.clone()
    mx, sums, picked = torch.ops.megads.softmax_rows_(buf, t)
    assert mx.dtype == sums.dtype == picked.dtype == dtype and mx.shape == (9,)
    assert torch.equal(mx.double(), want_max) and torch.equal(picked.double(), want_pick)
    torch.testing.assert_close(buf.double(), want_exp, rtol=tol, atol=tol)  # in place
    torch.testing.assert_close(sums.double(), want_exp.sum(-1), rtol=tol, atol=0)


def test_non_finite_rows_propagate_as_torch(native):
    """A NaN logit makes its row NaN; +inf makes inf - inf = NaN; -inf logits are zero weights:
    the loss stays non-finite exactly where F.cross_entropy's is."""
    x, t = _logits(6, 37, torch.float32)
    x[0, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, :30] = float("-inf")
    t[3] = 31
    buf = x.clone()
    mx, sums, _ = torch.ops.megads.softmax_rows_(buf, t)
    assert torch.isnan(mx[0]) and torch.isnan(sums[0]) and torch.isnan(buf[0]).all()
    assert mx[2] == float("inf") and torch.isnan(sums[2])
    assert torch.isfinite(sums[3]) and (buf[3, :30] == 0).all()
    from megads.parallel.tensor import vocab_parallel_cross_entropy

    got = vocab_parallel_cross_entropy(x.clone(), t.where((t >= 0) & (t < 37), -100), owned=True)
    want = F.cross_entropy(x.double(), t.where((t >= 0) & (t < 37), -100), reduction="none")
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    ok = torch.isfinite(want)
    torch.testing.assert_close(got[ok].double(), want[ok], rtol=2e-6, atol=2e-6)


def test_refusals(native):
    with pytest.raises(RuntimeError, match="contiguous float32/float64"):
        torch.ops.megads.softmax_rows_(torch.zeros(4, 6).t(), torch.zeros(6, dtype=torch.long))
    with pytest.raises(RuntimeError, match="contiguous float32/float64"):
        torch.ops.megads.softmax_rows_(torch.zeros(4, 6, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="target must be"):
        torch.ops.megads.softmax_rows_(torch.zeros(4, 6), torch.zeros(5, dtype=torch.long))


@pytest.mark.skipif(os.environ.get("MEGADS_CPU_PLAIN", "0") not in ("", "0"), reason="the kernel's fast path")
@pytest.mark.parametrize("V", [101, 16384 + 3])
def test_model_loss_takes_the_kernel_and_equals_cross_entropy(native, monkeypatch, V):
    """float32 CPU logits (AVX2): the loss's forward runs the kernel (counted), its loss and
    gradient equal F.cross_entropy in float64 at float32 rounding, and the torch path's within the
    same."""
    from megads import ops
    from megads.parallel import tensor

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel is taken on AVX2 CPUs only")
    calls = []
    real = tensor._native_softmax_rows
    monkeypatch.setattr(tensor, "_native_softmax_rows", lambda x: calls.append(real(x)) or calls[-1])
    x, t = _logits(33, V, torch.float32, seed=3)
    t[[1, 4, 7]] = -100
    w = torch.rand(33, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_in = x.double().requires_grad_()
    (F.cross_entropy(ref_in, t, reduction="none") * w).sum().backward()
    runs = {}
    for backend in ("native", "torch"):
        prev = ops.set_backend(backend)
        try:
            leaf = x.clone().requires_grad_()
            loss = tensor.vocab_parallel_cross_entropy(leaf * 1, t, owned=True)
            (loss.double() * w).sum().backward()
            runs[backend] = (loss.detach(), leaf.grad)
        finally:
            ops.set_backend(prev)
    assert calls == [True, False]
    ref = F.cross_entropy(x.double(), t, reduction="none")
    for loss, grad in runs.values():
        torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(runs["native"][0], runs["torch"][0], rtol=2e-6, atol=2e-6)


@pytest.mark.skipif(os.environ.get("MEGADS_CPU_PLAIN", "0") not in ("", "0"), reason="already the plain loops")
def test_plain_loops_equal_float64_formulas(native):
    """The plain loops (CPUs without AVX2), MEGADS_CPU_PLAIN=1 in a fresh process: the kernel's
    comparisons again."""
    run_plain_loops(__file__, "equal_float64 or non_finite or refusals", 12)
