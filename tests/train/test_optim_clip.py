"""The guarded optimizer's own clipping (used without ZeRO) against torch's clip_grad_norm_, and
the replica weights of megads.parallel.gradnorm from their definition."""
import math

import pytest
import torch

from megads.parallel import gradnorm
from megads.parallel.state import Layout
from megads.train.optim import GuardedAdamW


def _model_and_grads(seed, scale):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    for p in m.parameters():
        p.grad = torch.randn_like(p) * scale
    return m


@pytest.mark.parametrize("scale", [0.01, 1.0])  # below and above max_norm
def test_guarded_adamw_clips_like_torch(scale):
    ref, ours = _model_and_grads(0, scale), _model_and_grads(0, scale)
    expect_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
    torch.optim.AdamW(ref.parameters(), lr=0.1).step()
    opt = GuardedAdamW(ours.parameters(), lr=0.1)
    opt.norm_weights = {p: 1.0 for p in ours.parameters()}
    opt.max_norm = 1.0
    opt.step()
    assert opt.last_grad_norm == pytest.approx(expect_norm, rel=1e-6)
    assert not opt.last_step_skipped
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_guarded_adamw_skips_nonfinite_without_touching_weights():
    m = _model_and_grads(1, 1.0)
    before = [p.detach().clone() for p in m.parameters()]
    next(iter(m.parameters())).grad[0, 0] = float("inf")
    opt = GuardedAdamW(m.parameters(), lr=0.1)
    opt.norm_weights = {p: 1.0 for p in m.parameters()}
    opt.max_norm = 1.0
    opt.step()
    assert opt.last_step_skipped and not math.isfinite(opt.last_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_replica_weights_count_every_element_once():
    """Σ over the ranks of a layout of each kind's weight = 1 (whole gradients without ZeRO;
    partitions with ZeRO, where only replicated parameters repeat, once per TP rank)."""
    for world, tp, ep in [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2), (8, 2, 4), (8, 1, 2)]:
        lay = Layout(world, tp, 1, ep)
        kinds = {"tp": "tp", "rep": "replicated", "exp": "expert"}
        w0 = gradnorm.zero0_weights(kinds, lay)
        # without ZeRO: tp-sharded elements live on dp ranks, replicated on all, experts on edp
        assert w0["tp"] * lay.dp == pytest.approx(1) and w0["rep"] * world == pytest.approx(1)
        assert w0["exp"] * lay.edp == pytest.approx(1)
        wz = gradnorm.zero_weights(kinds, lay)
        assert wz["tp"] == 1 and wz["exp"] == 1 and wz["rep"] * tp == pytest.approx(1)


def test_weighted_norm_equals_the_float64_formula():
    """Σ w_p ||g_p||² (each gradient's norm in its own dtype, at least float32; squares summed in
    float64) against the sum written out in float64; a weight-0 gradient's NaN still shows."""
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(37, 11, generator=g) * 5, torch.randn(1000, generator=g, dtype=torch.float64),
             (torch.randn(64, generator=g) * 1e3).to(torch.bfloat16), torch.randn(3, generator=g)]
    params = [torch.nn.Parameter(torch.empty(0)) for _ in grads]
    weights = {params[0]: 0.5, params[1]: 1.0, params[2]: 0.25}  # params[3]: 1 by default
    want = sum(weights.get(p, 1.0) * float(x.double().pow(2).sum()) for x, p in zip(grads, params))
    got = gradnorm.weighted_sq_norm(zip(grads, params), weights, torch.device("cpu"))
    assert got.dtype == torch.float64 and float(got) == pytest.approx(want, rel=1e-6)
    only64 = gradnorm.weighted_sq_norm([(grads[1], params[1])], weights, torch.device("cpu"))
    assert float(only64) == pytest.approx(float(grads[1].pow(2).sum()), rel=1e-13)
    assert float(gradnorm.weighted_sq_norm([], weights, torch.device("cpu"))) == 0.0
    grads[3][1] = float("nan")
    assert math.isnan(float(gradnorm.weighted_sq_norm(zip(grads, params), {**weights, params[3]: 0.0},
                                                      torch.device("cpu"))))


@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_guard_flag_without_norm_weights(bad):
    """The guard's own flag (the path under ZeRO, where DeepSpeed clips): one non-finite element in
    any gradient, whatever its dtype, skips the whole update; a finite set steps, and the check
    leaves every gradient's bits as they were (subnormals and -0.0 included)."""
    from megads.train.optim import non_finite_flag

    m = _model_and_grads(2, 1.0)
    extra = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    extra.grad = torch.tensor([1e-310, -0.0, 2.0, -3.0, 1e300], dtype=torch.float64)
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    half.grad = torch.tensor([1.0, -2.0, 1e-40, 0.5], dtype=torch.bfloat16)
    if bad is not None:
        half.grad[2] = bad
    params = list(m.parameters()) + [extra, half]
    grads_before = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    flag = non_finite_flag([p.grad for p in params], torch.device("cpu"))
    assert flag.shape == (1,) and float(flag) == (0.0 if bad is None else 1.0)
    for a, b in zip(grads_before, params):
        assert torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int64 if a.dtype ==
                                  torch.float64 else torch.int32),
                           b.grad.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int64 if a.dtype ==
                                       torch.float64 else torch.int32))
    opt = GuardedAdamW(params, lr=0.1)
    opt.step()
    assert opt.last_step_skipped == (bad is not None)
    changed = [not torch.equal(a, b) for a, b in zip(before, params)]
    assert not any(changed) if bad is not None else all(changed[:4])
