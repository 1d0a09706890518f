"""Native router op == the torch reference, forward and backward (megads.ops.route)."""
from __future__ import annotations

import pytest
import torch

from megads.ops import reference

# (T, E, top_k, n_group, topk_group)
SHAPES = [
    (1, 8, 2, 1, 1),
    (37, 16, 4, 4, 2),
    (256, 64, 8, 8, 4),  # the benchmark's layout
    (33, 256, 8, 8, 4),  # DeepSeek-V3's layout
    (64, 32, 32, 4, 4),  # top-k = number of experts
    (50, 16, 16, 1, 1),  # top-k = number of experts, no groups
    (64, 16, 3, 16, 5),  # groups of one
    (19, 12, 5, 3, 1),  # one group kept
]


def _run(route, logits, bias, grad_w, **kw):
    """route forward + backward of sum(weights * grad_w): (weights, indices, counts, d logits)."""
    leaf = logits.detach().clone().requires_grad_(True)
    w, idx, counts = route(leaf, bias, **kw)
    (w.float() * grad_w).sum().backward()
    return w.detach(), idx, counts, leaf.grad


def _compare(native, logits, bias, *, top_k, n_group, topk_group, score_func, route_scale=2.5, norm=True,
             exact_indices=True):
    T, E = logits.shape
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, score_func=score_func, route_scale=route_scale,
              norm_topk_prob=norm)
    grad_w = torch.randn(T, top_k, device=logits.device)
    w0, i0, c0, g0 = _run(reference.route, logits, bias, grad_w, **kw)
    w1, i1, c1, g1 = _run(native.route, logits, bias, grad_w, **kw)
    assert w1.dtype == torch.float32 and i1.dtype == torch.int64 and c1.dtype == torch.int64
    assert w1.shape == (T, top_k) and i1.shape == (T, top_k) and c1.shape == (E,)
    if exact_indices:
        torch.testing.assert_close(i1, i0, rtol=0, atol=0)
        torch.testing.assert_close(c1, c0, rtol=0, atol=0)
    torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-7)
    assert g1.dtype == logits.dtype
    # softmax: sum_j dg_j * g_j cancels to ~0 (weights are scale-free), leaving rounding noise ~1e-7
    tol = dict(rtol=1e-5, atol=1e-6) if logits.dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(g1, g0, **tol)
    return i1, c1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-k{}-g{}-tg{}".format(*s))
def test_route_matches_reference(native, device, shape, score_func, with_bias, dtype):
    T, E, k, G, tg = shape
    torch.manual_seed(T * 1000 + E + k)
    logits = (torch.randn(T, E, device=device) * 2).to(dtype)
    bias = torch.randn(E, device=device) * 0.3 if with_bias else None
    _compare(native, logits, bias, top_k=k, n_group=G, topk_group=tg, score_func=score_func)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(200, 16, 4, 4, 2), (128, 64, 8, 8, 4), (64, 16, 3, 16, 5), (40, 8, 8, 2, 2)],
                         ids=lambda s: "T{}-E{}-k{}-g{}-tg{}".format(*s))
def test_route_ties_lower_index_wins(native, device, shape, score_func):
    """Integer logits and a two-valued bias make many exactly equal scores and group scores."""
    T, E, k, G, tg = shape
    torch.manual_seed(7)
    logits = torch.randint(-2, 3, (T, E), device=device).float()
    for bias in (None, torch.randint(0, 2, (E,), device=device).float() * 0.25, torch.zeros(E, device=device)):
        _compare(native, logits, bias, top_k=k, n_group=G, topk_group=tg, score_func=score_func)
    flat = torch.zeros(T, E, device=device)  # every score equal: experts 0..k-1 of the first groups
    idx, _ = _compare(native, flat, None, top_k=k, n_group=G, topk_group=tg, score_func=score_func)
    assert (idx == torch.arange(k, device=device)).all()


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_one_expert_takes_all(native, device, score_func):
    """A dominant bias sends every token to one expert first; most experts get no token."""
    T, E = 300, 32
    torch.manual_seed(3)
    logits = torch.randn(T, E, device=device)
    bias = torch.zeros(E, device=device)
    bias[5] = 10.0
    _, counts = _compare(native, logits, bias, top_k=1, n_group=4, topk_group=1, score_func=score_func)
    assert counts[5] == T and counts.sum() == T
    bias[6] = 10.0
    _, counts = _compare(native, logits, bias, top_k=2, n_group=4, topk_group=1, score_func=score_func)
    assert counts[5] == T and counts[6] == T and (counts == 0).sum() == E - 2


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("route_scale", [1.0, 2.5])
def test_route_options(native, device, norm, route_scale):
    torch.manual_seed(11)
    logits = torch.randn(64, 32, device=device)
    bias = torch.randn(32, device=device) * 0.1
    for score_func in ("sigmoid", "softmax"):
        _compare(native, logits, bias, top_k=6, n_group=4, topk_group=2, score_func=score_func,
                 route_scale=route_scale, norm=norm)


def test_route_empty_batch(native, device):
    logits = torch.randn(0, 16, device=device, requires_grad=True)
    w, idx, counts = native.route(logits, None, top_k=4, n_group=4, topk_group=2, score_func="sigmoid")
    assert w.shape == (0, 4) and idx.shape == (0, 4) and (counts == 0).all() and counts.shape == (16,)
    w.sum().backward()
    assert logits.grad.shape == (0, 16)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [True, False])
def test_route_gradcheck_float64(native, device, score_func, norm):
    """float64 logits are routed in float64: check the op's gradient against finite differences."""
    torch.manual_seed(5)
    logits = torch.randn(12, 16, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, device=device, dtype=torch.float64) * 0.1

    def weights(x):
        return native.route(x, bias, top_k=4, n_group=4, topk_group=2, score_func=score_func, route_scale=2.5,
                            norm_topk_prob=norm)[0]

    assert weights(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(weights, (logits,), eps=1e-6, atol=1e-8)
    ref = reference.route(logits.detach(), bias, top_k=4, n_group=4, topk_group=2, score_func=score_func,
                          route_scale=2.5, norm_topk_prob=norm)
    torch.testing.assert_close(weights(logits).detach().float(), ref[0], rtol=1e-5, atol=1e-6)


def test_route_bad_arguments(native):
    logits = torch.randn(4, 12)
    with pytest.raises(RuntimeError, match="n_group"):
        native.route(logits, None, top_k=2, n_group=5, topk_group=1)
    with pytest.raises(RuntimeError, match="top_k"):
        native.route(logits, None, top_k=13)
    with pytest.raises(RuntimeError, match="score_func"):
        native.route(logits, None, top_k=2, score_func="relu")
    with pytest.raises(RuntimeError, match="bias"):
        native.route(logits, torch.zeros(11), top_k=2)
