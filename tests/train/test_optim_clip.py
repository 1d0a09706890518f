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
