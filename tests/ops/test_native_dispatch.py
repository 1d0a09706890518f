"""Native permute/unpermute == the torch reference, forward and backward; the ops under torch.compile."""
from __future__ import annotations

import pytest
import torch

from megads.ops import reference

# (T, H, E, k)
SHAPES = [(1, 8, 4, 1), (37, 24, 8, 2), (128, 64, 16, 4), (256, 130, 64, 8), (64, 32, 8, 8), (5, 3, 3, 3)]


def _indices(pattern: str, T: int, E: int, k: int, device) -> torch.Tensor:
    if pattern == "random":  # k distinct experts per token, as the router gives
        return torch.rand(T, E, device=device).argsort(dim=1)[:, :k].contiguous()
    if pattern == "one_expert":  # every token to expert 0 first (k = 1: only expert 0 has tokens)
        return torch.arange(k, device=device).expand(T, k).contiguous()
    if pattern == "sparse":  # only the odd experts get tokens (the even ones none)
        odd = torch.arange(1, E, 2, device=device)
        pick = torch.rand(T, odd.numel(), device=device).argsort(dim=1)[:, :k] % odd.numel()
        return odd[pick].contiguous()
    raise ValueError(pattern)


def _dispatch(impl, x, weights, indices, E, grad_y):
    """permute -> an expert-dependent map -> unpermute, forward and backward."""
    xl = x.detach().clone().requires_grad_(True)
    wl = weights.detach().clone().requires_grad_(True)
    x_sorted, offsets, state = impl.permute(xl, indices, E)
    scale = torch.repeat_interleave(torch.arange(1, E + 1, device=x.device, dtype=x.dtype) / E, offsets.diff(),
                                    output_size=x_sorted.shape[0])
    y_sorted = x_sorted * scale.unsqueeze(-1) + 0.5 * x_sorted.square()  # rows of expert e: its own map
    y = impl.unpermute(y_sorted, wl, state)
    (y.float() * grad_y).sum().backward()
    return x_sorted.detach(), offsets, state, y.detach(), xl.grad, wl.grad


@pytest.mark.parametrize("wdtype", ["fp32-weights", "x-dtype-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["random", "one_expert", "sparse"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-E{}-k{}".format(*s))
def test_dispatch_matches_reference(native, device, shape, pattern, dtype, wdtype):
    T, H, E, k = shape
    if pattern == "sparse" and k > E // 2:
        pytest.skip("not enough odd experts for k distinct ones")
    torch.manual_seed(T + H + E + k)
    x = torch.randn(T, H, device=device).to(dtype)
    indices = _indices(pattern, T, E, k, device)
    weights = torch.rand(T, k, device=device)
    if wdtype == "x-dtype-weights":
        weights = weights.to(dtype)
    grad_y = torch.randn(T, H, device=device)
    xs0, off0, st0, y0, gx0, gw0 = _dispatch(reference, x, weights, indices, E, grad_y)
    xs1, off1, st1, y1, gx1, gw1 = _dispatch(native, x, weights, indices, E, grad_y)
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(xs1, xs0, **exact)  # a stable permutation: bit-identical rows
    torch.testing.assert_close(off1, off0, **exact)
    torch.testing.assert_close(st1.order, st0.order, **exact)
    torch.testing.assert_close(st1.token_of, st0.token_of, **exact)
    assert (st1.num_tokens, st1.top_k) == (T, k)
    assert y1.dtype == dtype and gx1.dtype == dtype and gw1.dtype == weights.dtype
    if dtype == torch.float32:
        tol = dict(rtol=1e-6, atol=1e-6)
    else:  # the reference sums x's gradient in bf16 (index_add); native sums in fp32, rounds once
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    torch.testing.assert_close(gw1, gw0, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 and
                                             weights.dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)))


def test_dispatch_float64(native, device):
    torch.manual_seed(0)
    T, H, E, k = 33, 17, 8, 3
    x = torch.randn(T, H, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, device=device, dtype=torch.float64, requires_grad=True)
    indices = _indices("random", T, E, k, device)

    def f(x, w):
        xs, off, st = native.permute(x, indices, E)
        return native.unpermute(xs * xs, w, st)

    assert torch.autograd.gradcheck(f, (x, w))
    xs, off, st = reference.permute(x.detach(), indices, E)
    torch.testing.assert_close(f(x, w), reference.unpermute(xs * xs, w.detach(), st), rtol=1e-6, atol=1e-6)


def test_dispatch_empty_batch(native, device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    idx = torch.zeros(0, 2, dtype=torch.int64, device=device)
    xs, off, st = native.permute(x, idx, 4)
    assert xs.shape == (0, 16) and (off == 0).all() and off.shape == (5,)
    y = native.unpermute(xs, torch.zeros(0, 2, device=device), st)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_permute_rejects_bad_indices(native):
    with pytest.raises(RuntimeError, match=r"\[0, 4\)"):
        native.permute(torch.randn(3, 2), torch.tensor([[0], [4], [1]]), 4)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_permute_unpermute_chain(native, device, score_func):
    """The MoE layer's data flow: gradients reach the logits (through weights) and x, both paths equal."""
    torch.manual_seed(1)
    T, H, E, k = 96, 40, 16, 4
    logits0 = torch.randn(T, E, device=device)
    x0 = torch.randn(T, H, device=device)
    bias = torch.randn(E, device=device) * 0.2
    expert_w = torch.randn(E, H, H, device=device) / H ** 0.5
    results = []
    for impl in (reference, native):
        logits = logits0.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        w, idx, counts = impl.route(logits, bias, top_k=k, n_group=4, topk_group=2, score_func=score_func,
                                    route_scale=2.5)
        xs, off, st = impl.permute(x, idx, E)
        ys = torch.cat([xs[a:b] @ expert_w[e] for e, (a, b) in enumerate(zip(off[:-1].tolist(), off[1:].tolist()))])
        y = impl.unpermute(torch.tanh(ys), w, st)
        y.square().sum().backward()
        results.append((y.detach(), counts, logits.grad, x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # gradients here reach ~100


def _sample_inputs(device):
    torch.manual_seed(0)
    T, H, E, k = 24, 16, 8, 2
    logits = torch.randn(T, E, device=device, requires_grad=True)
    bias = torch.randn(E, device=device)
    x = torch.randn(T, H, device=device, requires_grad=True)
    idx = torch.rand(T, E, device=device).argsort(1)[:, :k].contiguous()
    y_sorted = torch.randn(T * k, H, device=device, requires_grad=True)
    w = torch.rand(T, k, device=device, requires_grad=True)
    inv = torch.randperm(T * k, device=device)
    return logits, bias, x, idx, y_sorted, w, inv, E, k


def test_opcheck(native, device):
    """torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch."""
    logits, bias, x, idx, y_sorted, w, inv, E, k = _sample_inputs(device)
    ops = torch.ops.megads
    torch.library.opcheck(ops.route.default, (logits, bias, k, 4, 2, "sigmoid", 2.5, True))
    torch.library.opcheck(ops.route.default, (logits, None, k, 1, 1, "softmax", 1.0, False))
    torch.library.opcheck(ops.permute.default, (x, idx, E))
    torch.library.opcheck(ops.unpermute.default, (y_sorted, w, inv))
    g = torch.randn(T := logits.shape[0], k, device=device)
    torch.library.opcheck(ops.route_backward.default, (g, logits.detach(), idx, "sigmoid", 2.5, True))
    torch.library.opcheck(ops.permute_backward.default, (y_sorted.detach(), inv, k))
    torch.library.opcheck(ops.unpermute_backward.default,
                          (torch.randn(T, x.shape[1], device=device), y_sorted.detach(), w.detach(), inv))


def test_torch_compile_fullgraph(native, device):
    """route + permute + unpermute trace into one graph (fake kernels, autograd) and match eager."""
    logits, bias, x, _, _, _, _, E, k = _sample_inputs(device)

    def layer(logits, x):
        w, idx, counts = native.route(logits, bias, top_k=k, n_group=4, topk_group=2, score_func="sigmoid",
                                      route_scale=2.5)
        xs, off, st = native.permute(x, idx, E)
        return native.unpermute(torch.sin(xs), w, st), counts

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (logits.shape[0], logits.shape[0] - 5):  # symbolic token count: one graph for both
        outs = []
        for fn in (layer, compiled):
            lg, xx = logits[:T].detach().clone().requires_grad_(True), x[:T].detach().clone().requires_grad_(True)
            y, counts = fn(lg, xx)
            y.square().sum().backward()
            outs.append((y.detach(), counts, lg.grad, xx.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a)
