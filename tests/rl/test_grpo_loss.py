"""grpo_loss and group_advantages against a float64 hand computation written out here."""
import math

import pytest
import torch

from megads.rl import group_advantages, grpo_loss


def hand_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation, max_tokens=None):
    """Loops over plain floats: the formulas of REFERENCE.md §6."""
    B, T = len(logp), len(logp[0])
    per_seq, all_tok, n_tok = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            cl = min(max(rho, 1 - eps_low), 1 + eps_high)
            v = -min(rho * adv[i], cl * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                v += beta * (math.exp(d) - d - 1)
            s += v
            n += 1
        per_seq.append(s / max(n, 1))
        all_tok += s
        n_tok += n
    if aggregation == "seq-mean-token-mean":
        return sum(per_seq) / B
    if aggregation == "token-mean":
        return all_tok / n_tok
    return all_tok / (B * (max_tokens or T))


def _case(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.5  # ratios well past both clips
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=torch.float64)[:B]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_hand_computation(aggregation, beta):
    logp, old, ref, adv, mask = _case()
    loss, stats = grpo_loss(logp, old, ref if beta else None, adv, mask, eps_low=0.2, eps_high=0.28, beta=beta,
                            aggregation=aggregation, max_tokens=8)
    want = hand_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, beta,
                     aggregation, max_tokens=8)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    # the case reaches both clip sides, so the clipped branch is exercised
    assert stats["clip_low"] > 0 and stats["clip_high"] > 0


def test_clip_fractions_and_ratio_stats():
    logp, old, ref, adv, mask = _case()
    _, stats = grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28)
    rho = torch.exp(logp - old)
    A = adv.unsqueeze(-1).expand_as(rho)
    m = mask
    low = ((rho < 0.8) & (A < 0) & m).sum() / m.sum()
    high = ((rho > 1.28) & (A > 0) & m).sum() / m.sum()
    assert stats["clip_low"].item() == pytest.approx(low.item())
    assert stats["clip_high"].item() == pytest.approx(high.item())
    assert stats["ratio"].item() == pytest.approx(rho[m].mean().item())
    d = ref - logp
    assert stats["kl"].item() == pytest.approx((torch.exp(d) - d - 1)[m].mean().item())


def test_clipped_tokens_have_no_gradient_and_unclipped_do():
    logp, old, _, adv, mask = _case()
    logp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="token-mean")
    loss.backward()
    rho = torch.exp(logp.detach() - old)
    A = adv.unsqueeze(-1).expand_as(rho)
    clipped = ((rho > 1.2) & (A > 0)) | ((rho < 0.8) & (A < 0))
    g = logp.grad
    assert torch.all(g[clipped & mask] == 0)
    assert torch.all(g[~mask] == 0)
    free = ~clipped & mask
    # d/dlogp of -rho*A / N = -rho*A / N
    assert torch.allclose(g[free], (-rho * A / mask.sum())[free])


def test_k3_value_and_gradient_sign():
    # k3 >= 0, zero at logp == ref; its gradient pushes logp toward ref
    ref = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -1.0, -1.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp.detach(), ref, torch.zeros(1, dtype=torch.float64), mask, beta=1.0,
                            aggregation="token-mean")
    d = (ref - logp.detach())[0]
    k3 = torch.exp(d) - d - 1
    assert loss.item() == pytest.approx(k3.mean().item(), rel=1e-12)
    assert k3[0] == 0 and torch.all(k3 >= 0)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0
    assert g[1] > 0  # logp above ref: descending the gradient lowers it
    assert g[2] < 0  # logp below ref: descending raises it
    assert stats["kl"].item() == pytest.approx(k3.mean().item())


def test_global_normalisation_equals_one_batch():
    # two halves with the global counts passed in sum to the whole batch's loss
    logp, old, ref, adv, mask = _case()
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        whole, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1, aggregation=agg, max_tokens=6)
        parts = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], beta=0.1, aggregation=agg, max_tokens=6,
                              num_sequences=4, num_tokens=mask.sum())[0] for s in (slice(0, 1), slice(1, 4)))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_bad_arguments():
    logp, old, ref, adv, mask = _case()
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, float("nan"), 0.0, 0.0])
    a, zero = group_advantages(r, 4, "group", eps=0.0)
    # group 0: mean .5, unbiased std sqrt(1/3)
    s = math.sqrt(((0.5 ** 2) * 4) / 3)
    assert torch.allclose(a[:4].double(), torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / s)
    assert torch.all(a[4:8] == 0) and zero.tolist() == [False, True, False]
    # group 2: the NaN is excluded: mean 1/3 over three, A = 0 for it
    m = 1 / 3
    s2 = math.sqrt(((1 - m) ** 2 + 2 * m ** 2) / 2)
    assert a[9] == 0
    assert a[8].item() == pytest.approx((1 - m) / s2, rel=1e-6)
    a_none, _ = group_advantages(r, 4, "none")
    assert a_none[0].item() == pytest.approx(0.5) and a_none[10].item() == pytest.approx(-m, rel=1e-6)
    a_batch, _ = group_advantages(r, 4, "batch", eps=0.0)
    judged = r[~torch.isnan(r)]
    assert a_batch[0].item() == pytest.approx(0.5 / judged.std().item(), rel=1e-6)
    with pytest.raises(ValueError):
        group_advantages(r, 4, "rank")
