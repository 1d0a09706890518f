"""The classic expert-level auxiliary balance loss (model.aux_loss_alpha, megads/model/balance.py):
values worked out by hand, padding left out, the balanced router's value, its gradient, and what
the MoE layer adds to the balance term (and does not, by default)."""
from __future__ import annotations

import pytest
import torch

from megads import ops
from megads.config import ModelConfig
from megads.model.balance import expert_balance_loss
from megads.model.moe import MoE

# 4 tokens, 4 experts, top-2; the rows are softmax probabilities (each sums to 1)
SCORES = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                       [0.10, 0.20, 0.30, 0.40],
                       [0.25, 0.25, 0.25, 0.25],
                       [0.70, 0.10, 0.10, 0.10]], dtype=torch.float64)
CHOSEN = torch.tensor([[0, 1], [3, 2], [0, 1], [0, 1]])


def test_loss_by_hand():
    # hits: expert 0 by tokens 0, 2, 3 -> 3; expert 1 by 0, 2, 3 -> 3; expert 2 by 1 -> 1; expert 3 by 1 -> 1
    # f_i = E / (K T) * hits = 4 / (2 * 4) * hits = (1.5, 1.5, 0.5, 0.5)
    # P_0 = (0.40 + 0.10 + 0.25 + 0.70) / 4 = 0.3625; P_1 = P_2 = P_3 = 0.85 / 4 = 0.2125
    # L = 1.5 * 0.3625 + 1.5 * 0.2125 + 0.5 * 0.2125 + 0.5 * 0.2125 = 1.075
    got = expert_balance_loss(SCORES, CHOSEN, num_experts=4, top_k=2)
    assert float(got) == pytest.approx(1.075, abs=1e-12)


def test_padding_is_left_out_by_hand():
    # token 3 masked: T = 3; hits (2, 2, 1, 1); f = 4 / (2 * 3) * hits = (4/3, 4/3, 2/3, 2/3)
    # P = (0.75, 0.75, 0.75, 0.75) / 3 = 0.25 each; L = 0.25 * (4/3 + 4/3 + 2/3 + 2/3) = 1.0
    keep = torch.tensor([True, True, True, False])
    got = expert_balance_loss(SCORES, CHOSEN, num_experts=4, top_k=2, keep=keep)
    assert float(got) == pytest.approx(1.0, abs=1e-12)


def test_sigmoid_scores_are_normalised_by_hand():
    # sigmoid-style scores that do not sum to 1: each row is divided by its sum first
    # row 0: (0.8, 0.4, 0.4, 0.4) / 2.0 = (0.4, 0.2, 0.2, 0.2); row 1: (0.1, 0.1, 0.1, 0.7) / 1.0
    scores = torch.tensor([[0.8, 0.4, 0.4, 0.4], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    chosen = torch.tensor([[0, 1], [3, 0]])
    # hits (2, 1, 0, 1); f = 4 / (2 * 2) * hits = (2, 1, 0, 1)
    # P = ((0.4 + 0.1) / 2, (0.2 + 0.1) / 2, (0.2 + 0.1) / 2, (0.2 + 0.7) / 2) = (0.25, 0.15, 0.15, 0.45)
    # L = 2 * 0.25 + 1 * 0.15 + 0 + 1 * 0.45 = 1.1
    got = expert_balance_loss(scores, chosen, num_experts=4, top_k=2)
    assert float(got) == pytest.approx(1.1, abs=1e-12)


def test_a_balanced_router_scores_one():
    T, E, K = 8, 4, 2
    scores = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    chosen = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # every expert 4 times
    assert float(expert_balance_loss(scores, chosen, E, K)) == pytest.approx(1.0, abs=1e-12)


def test_gradient_flows_through_the_scores_only():
    # dL/ds'_{i,t} = f_i / T (the counts are constants); checked against autograd through the
    # normalisation s' = s / sum(s), where sum_i dL/ds_i * s_i = 0 per token
    s = SCORES.clone().requires_grad_(True)
    loss = expert_balance_loss(s, CHOSEN, 4, 2)
    loss.backward()
    f = torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=torch.float64)
    row_sum = SCORES.sum(-1, keepdim=True)
    g_norm = (f / 4).expand(4, 4)  # dL/ds' per token
    expected = g_norm / row_sum - (g_norm * SCORES).sum(-1, keepdim=True) / row_sum ** 2
    torch.testing.assert_close(s.grad, expected, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: expert_balance_loss(x, CHOSEN, 4, 2), (SCORES.clone().requires_grad_(True),))


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=53, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_layers=2,
                first_k_dense=1, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, max_seq_len=32, init_std=0.2)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_moe_adds_alpha_times_the_loss_of_its_own_routing(score_func):
    cfg = moe_cfg(aux_loss_alpha=0.05, router_bias=False, score_func=score_func)
    torch.manual_seed(0)
    moe = MoE(cfg).double().train()
    x = torch.randn(2, 6, cfg.hidden_size, dtype=torch.float64)
    _, aux = moe(x)
    aux = aux.detach()
    with torch.no_grad():
        _, idx, _, logits = moe.gate(x.reshape(-1, cfg.hidden_size))
    expected = 0.05 * expert_balance_loss(ops.router_scores(logits, score_func), idx, 8, 2)
    assert float(aux) == pytest.approx(float(expected), rel=1e-6)
    assert float(aux) > 0
    # padding (a token mask) is not counted
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    aux_masked = moe(x, mask)[1].detach()
    expected = 0.05 * expert_balance_loss(ops.router_scores(logits, score_func), idx, 8, 2, keep=mask.reshape(-1))
    assert float(aux_masked) == pytest.approx(float(expected), rel=1e-6)
    # a gradient reaches the router
    moe.zero_grad()
    moe(x)[1].backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    # not in evaluation
    moe.eval()
    assert float(moe(x)[1].detach()) == 0.0


def test_default_config_adds_no_aux_loss():
    cfg = moe_cfg()
    assert cfg.aux_loss_alpha == 0.0
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    assert float(moe(torch.randn(2, 5, cfg.hidden_size))[1].detach()) == 0.0
    with pytest.raises(Exception, match="aux_loss_alpha"):
        moe_cfg(aux_loss_alpha=-0.1)
