"""DeepSeekMoE: group-limited routing against brute force, permute/unpermute against a loop, the
aux-loss-free bias update, the sequence-wise balance loss by hand, no token dropping, gradcheck."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from megads import ops
from megads.config import ModelConfig
from megads.model.moe import MoE
from megads.model.transformer import Transformer
from megads.ops import reference


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=53, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_layers=3,
                first_k_dense=1, num_heads=2, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4,
                qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=1, topk_group=1, max_seq_len=32, init_std=0.2)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture(params=["torch", "native"])
def backend(request):
    """Run a test on the torch reference ops and on the native kernels (when they load)."""
    try:
        prev = ops.set_backend(request.param)
    except Exception as e:  # the native library is not built here
        pytest.skip(f"native ops unavailable: {e}")
    yield request.param
    ops.set_backend(prev)


# ----------------------------------------------------------------------------- routing

def brute_force_route(logits, bias, *, top_k, n_group, topk_group, score_func, route_scale, norm_topk_prob):
    """Per token, in float64: every subset of topk_group groups is scored; the best subset's experts
    are the candidates; the k best biased scores among them are chosen."""
    T, E = logits.shape
    lg = logits.double()
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, -1)
    per = E // n_group
    all_idx, all_w = [], []
    for t in range(T):
        s = scores[t].tolist()
        b = bias.double().tolist() if bias is not None else [0.0] * E
        sel = [s[e] + b[e] for e in range(E)]
        gscore = []
        for g in range(n_group):
            members = sorted(sel[g * per:(g + 1) * per], reverse=True)
            gscore.append(sum(members[:2]) if bias is not None else members[0])
        best, best_val = None, None
        for subset in itertools.combinations(range(n_group), topk_group):
            val = sum(gscore[g] for g in subset)
            if best_val is None or val > best_val:
                best, best_val = subset, val
        cand = [e for g in best for e in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda e: -sel[e])[:top_k]
        w = [s[e] for e in chosen]
        if norm_topk_prob:
            tot = sum(w)
            w = [x / tot for x in w]
        all_idx.append(chosen)
        all_w.append([x * route_scale for x in w])
    return torch.tensor(all_w, dtype=torch.float64), torch.tensor(all_idx)


ROUTE_CASES = [
    # E, top_k, n_group, topk_group, score_func, bias, norm, route_scale
    (8, 2, 1, 1, "sigmoid", True, True, 1.0),
    (8, 2, 1, 1, "softmax", False, False, 1.0),
    (16, 4, 4, 2, "sigmoid", True, True, 2.5),
    (16, 4, 4, 2, "sigmoid", False, True, 2.5),
    (16, 3, 4, 1, "softmax", False, False, 16.0),
    (16, 6, 4, 3, "softmax", True, True, 1.0),
    (12, 3, 4, 4, "sigmoid", True, False, 1.5),
    (32, 8, 8, 4, "sigmoid", True, True, 2.5),  # the V3 shape, scaled down
]


@pytest.mark.parametrize("impl", ["reference", "dispatch"])
@pytest.mark.parametrize("E, k, n_group, topk_group, score_func, use_bias, norm, scale", ROUTE_CASES)
def test_route_matches_brute_force(impl, E, k, n_group, topk_group, score_func, use_bias, norm, scale):
    g = torch.Generator().manual_seed(E * 100 + k * 10 + n_group + topk_group)
    T = 24
    logits = torch.randn(T, E, generator=g) * 2
    bias = (torch.randn(E, generator=g) * 0.3) if use_bias else None
    kw = dict(top_k=k, n_group=n_group, topk_group=topk_group, score_func=score_func, route_scale=scale,
              norm_topk_prob=norm)
    route = reference.route if impl == "reference" else ops.route
    w, idx, counts = route(logits, bias, **kw)
    ew, eidx = brute_force_route(logits, bias, **kw)
    assert idx.shape == (T, k) and w.shape == (T, k) and counts.shape == (E,)
    # same chosen set per token, and the same weight for each chosen expert
    order, eorder = idx.sort(-1).indices, eidx.sort(-1).indices
    assert torch.equal(idx.gather(1, order), eidx.gather(1, eorder))
    torch.testing.assert_close(w.gather(1, order).double(), ew.gather(1, eorder), rtol=1e-5, atol=1e-6)
    assert torch.equal(counts.long(), torch.bincount(eidx.reshape(-1), minlength=E))
    assert counts.sum() == T * k
    if norm:
        torch.testing.assert_close(w.sum(-1).double(), torch.full((T,), scale, dtype=torch.float64), rtol=1e-6, atol=0)
    # the bias of these cases does change some selections (so the comparison above saw it at work)
    if use_bias:
        _, idx_nb, _ = route(logits, None, **kw)
        assert not torch.equal(idx_nb.sort(-1).values, idx.sort(-1).values)


def test_group_limit_restricts_experts_to_the_kept_groups():
    g = torch.Generator().manual_seed(0)
    T, E, G = 64, 16, 4
    logits = torch.randn(T, E, generator=g)
    _, idx, _ = reference.route(logits, torch.randn(E, generator=g), top_k=4, n_group=G, topk_group=2)
    groups = idx // (E // G)
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_bias_changes_selection_not_weights():
    g = torch.Generator().manual_seed(1)
    T, E = 32, 8
    logits = torch.randn(T, E, generator=g)
    kw = dict(top_k=2, n_group=2, topk_group=1, score_func="sigmoid", route_scale=2.5)
    w0, i0, _ = reference.route(logits, torch.zeros(E), **kw)
    # a constant bias keeps every ranking (and the top-2 group sums) as it is
    w1, i1, _ = reference.route(logits, torch.full((E,), 0.7), **kw)
    assert torch.equal(i0, i1)
    assert torch.equal(w0, w1)
    # a large bias forces expert 3 in; its weight is still its unbiased score
    bias = torch.zeros(E)
    bias[3] = 10.0
    w2, i2, _ = reference.route(logits, bias, **kw)
    assert (i2 == 3).any(-1).all() and (i2[:, 0] == 3).all()
    s = torch.sigmoid(logits)
    expected = s.gather(1, i2) / s.gather(1, i2).sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(w2, expected)
    # Gate: the same selection gives the same gate weights whatever the bias
    cfg = moe_cfg(n_group=2, topk_group=1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(T, cfg.hidden_size)
    wa, ia, _, _ = moe.gate(x)
    moe.gate.bias.fill_(0.25)
    wb, ib, _, _ = moe.gate(x)
    assert torch.equal(ia, ib) and torch.allclose(wa, wb, atol=0, rtol=0)


def test_weights_are_differentiable_in_the_logits():
    logits = torch.randn(6, 8, requires_grad=True)
    w, idx, _ = reference.route(logits, torch.randn(8), top_k=2, score_func="sigmoid", route_scale=2.0)
    (w * torch.arange(1.0, 3.0)).sum().backward()
    assert logits.grad is not None
    # only the chosen experts' logits get a gradient (normalised over the chosen ones)
    chosen = torch.zeros(6, 8, dtype=torch.bool).scatter_(1, idx, True)
    assert (logits.grad[~chosen] == 0).all() and (logits.grad[chosen] != 0).any()


# ----------------------------------------------------------------------------- permute / unpermute

@pytest.mark.parametrize("impl", ["reference", "dispatch"])
def test_permute_unpermute_match_a_per_token_loop(impl):
    mod = reference if impl == "reference" else ops
    g = torch.Generator().manual_seed(2)
    T, H, E, k = 13, 5, 6, 3
    x = torch.randn(T, H, generator=g)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    indices[0] = torch.tensor([5, 4, 3])  # expert 0..2 may be empty for some; make 5 busy
    x_sorted, offsets, state = mod.permute(x, indices, E)
    assert x_sorted.shape == (T * k, H) and offsets.tolist()[0] == 0 and offsets.tolist()[-1] == T * k
    for e in range(E):
        # rows of expert e: its tokens in token order (stable)
        tokens = [t for t in range(T) for j in range(k) if indices[t, j] == e]
        seg = x_sorted[offsets[e]:offsets[e + 1]]
        assert seg.shape[0] == len(tokens)
        if tokens:
            assert torch.equal(seg, x[tokens])
    # an "expert" e maps its rows to (e + 1) * row + e
    eid = torch.repeat_interleave(torch.arange(E), offsets[1:] - offsets[:-1])
    y_sorted = x_sorted * (eid + 1).unsqueeze(-1) + eid.unsqueeze(-1)
    weights = torch.rand(T, k, generator=g)
    y = mod.unpermute(y_sorted, weights, state)
    expected = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = int(indices[t, j])
            expected[t] += weights[t, j] * (x[t] * (e + 1) + e)
    torch.testing.assert_close(y, expected)


# ----------------------------------------------------------------------------- balancing

def test_update_bias_direction_and_size():
    gamma = 0.001
    cfg = moe_cfg(n_routed_experts=4, bias_update_speed=gamma)
    moe = MoE(cfg)
    counts = torch.tensor([7, 1, 4, 4])  # mean 4: expert 0 overloaded, 1 underloaded, 2/3 balanced
    moe.update_bias(counts)
    assert torch.equal(moe.gate.bias, torch.tensor([-gamma, gamma, 0.0, 0.0], dtype=torch.float32))
    before = moe.gate.bias.clone()
    moe.update_bias(torch.tensor([2, 2, 9, 3]))  # mean 4
    step = moe.gate.bias - before
    torch.testing.assert_close(step, torch.tensor([gamma, gamma, -gamma, gamma]), atol=1e-9, rtol=0)
    before = moe.gate.bias.clone()
    moe.update_bias(torch.tensor([5, 5, 5, 5]))  # equal load: unchanged, exactly
    assert torch.equal(moe.gate.bias, before)
    # no bias / gamma 0: nothing happens
    moe0 = MoE(moe_cfg(n_routed_experts=4, bias_update_speed=0.0))
    moe0.update_bias(counts)
    assert torch.equal(moe0.gate.bias, torch.zeros(4))
    nob = MoE(moe_cfg(n_routed_experts=4, router_bias=False))
    assert nob.gate.bias is None
    nob.update_bias(counts)


def test_sequence_balance_loss_by_hand():
    # 2 sequences x 2 tokens, 4 experts, top-2
    scores = torch.tensor([[0.5, 0.2, 0.2, 0.1],   # seq 0: already normalised
                           [0.6, 0.2, 0.1, 0.1],
                           [0.8, 0.4, 0.4, 0.4],   # seq 1: sums 2.0 -> [0.4, 0.2, 0.2, 0.2]
                           [0.2, 0.2, 0.2, 0.4]])
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    # seq 0: f = 4/(2*2) * [2, 1, 1, 0] = [2, 1, 1, 0]; P = [0.55, 0.2, 0.15, 0.1] -> 1.1+0.2+0.15 = 1.45
    # seq 1: f = [2, 1, 0, 1]; P = [0.3, 0.2, 0.2, 0.3] -> 0.6 + 0.2 + 0.3 = 1.1
    loss = reference.sequence_balance_loss(scores, indices, 2, 4, 2)
    assert loss.item() == pytest.approx((1.45 + 1.1) / 2, abs=1e-6)
    # perfectly balanced: f_i = 1 and P_i = 1/E gives 1
    flat = torch.full((4, 4), 0.3)
    bal = reference.sequence_balance_loss(flat, torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]), 2, 4, 2)
    assert bal.item() == pytest.approx(1.0, abs=1e-6)


def test_moe_layer_adds_alpha_times_the_sequence_loss():
    alpha = 0.01
    cfg = moe_cfg(seq_aux_alpha=alpha, score_func="sigmoid")
    torch.manual_seed(3)
    moe = MoE(cfg).train()
    B, S = 3, 5
    x = torch.randn(B, S, cfg.hidden_size)
    _, aux = moe(x)
    logits = x.reshape(B * S, -1) @ moe.gate.weight.T
    s = torch.sigmoid(logits)
    _, idx = (s + moe.gate.bias).topk(cfg.num_experts_per_tok, -1)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    expected = 0.0
    for b in range(B):
        f = torch.zeros(E)
        for t in range(S):
            for e in idx[b * S + t].tolist():
                f[e] += E / (k * S)
        P = (s[b * S:(b + 1) * S] / s[b * S:(b + 1) * S].sum(-1, keepdim=True)).mean(0)
        expected += (f * P).sum().item() / B
    assert aux.item() == pytest.approx(alpha * expected, rel=1e-5)
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    # evaluation: no balance loss
    _, aux_eval = moe.eval()(x)
    assert aux_eval.item() == 0.0


def test_expert_counts_and_router_bias_update_on_the_model():
    cfg = moe_cfg(num_layers=3, first_k_dense=1, mtp_depth=1, bias_update_speed=0.01)
    torch.manual_seed(4)
    model = Transformer(cfg)
    assert model.expert_counts() is None
    B, S = 2, 7
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    model(tokens, labels=torch.roll(tokens, -1, 1))
    counts = model.expert_counts()
    n_moe = (cfg.num_layers - cfg.first_k_dense)
    assert counts.shape == (n_moe + cfg.mtp_depth, cfg.n_routed_experts)
    # main layers see B*S tokens, the depth-1 MTP block B*(S-1)
    sums = counts.sum(-1).tolist()
    assert sums == [B * S * cfg.num_experts_per_tok] * n_moe + [B * (S - 1) * cfg.num_experts_per_tok]
    before = [m.gate.bias.clone() for m in model.moe_layers()]
    model.update_router_biases(counts)
    for m, b0, c in zip(model.moe_layers(), before, counts):
        step = m.gate.bias - b0
        expected = 0.01 * torch.sign(c.mean() - c)
        torch.testing.assert_close(step, expected, atol=1e-9, rtol=0)
        assert (step != 0).any()


# ----------------------------------------------------------------------------- the layer

def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """sum_j w_j expert_{e_j}(x) + shared(x), token by token, routing by brute force."""
    cfg = moe.cfg
    p = {k: v.double() for k, v in moe.state_dict().items()}
    X = x.reshape(-1, x.shape[-1]).double()
    logits = X @ p["gate.weight"].T
    bias = p.get("gate.bias")
    w, idx = brute_force_route(logits, bias, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
                               topk_group=cfg.topk_group, score_func=cfg.score_func,
                               route_scale=cfg.route_scale, norm_topk_prob=cfg.norm_topk_prob)

    def swiglu(v, w1, w3, w2):
        return w2 @ (F.silu(w1 @ v) * (w3 @ v))

    out = []
    for t in range(X.shape[0]):
        y = torch.zeros(X.shape[1], dtype=torch.float64)
        assert len(set(idx[t].tolist())) == cfg.num_experts_per_tok  # exactly k distinct experts
        for j in range(cfg.num_experts_per_tok):
            e = int(idx[t, j])
            y += w[t, j] * swiglu(X[t], p["experts.w1"][e], p["experts.w3"][e], p["experts.w2"][e])
        if moe.shared is not None:
            y += swiglu(X[t], p["shared.w1.weight"], p["shared.w3.weight"], p["shared.w2.weight"])
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, route_scale=2.5),
    dict(score_func="softmax", norm_topk_prob=False, router_bias=False, n_shared_experts=2, route_scale=4.0),
    dict(n_shared_experts=0),
])
def test_moe_output_equals_per_token_loop(kw, backend):
    cfg = moe_cfg(**kw)
    torch.manual_seed(5)
    moe = MoE(cfg).eval()
    if moe.gate.bias is not None:
        moe.gate.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 9, cfg.hidden_size)  # 27 tokens, 8 experts: every expert busy, none dropped
    y, aux = moe(x)
    torch.testing.assert_close(y.double(), per_token_reference(moe, x), rtol=1e-4, atol=1e-5)
    assert moe.last_counts.sum() == 27 * cfg.num_experts_per_tok
    # the same in float64 through the grouped-matmul loop (the torch reference routes in float32)
    moe64 = moe.double()
    tol = dict(rtol=1e-9, atol=1e-10) if backend == "native" else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moe64(x.double())[0], per_token_reference(moe64, x), **tol)


def test_moe_gradcheck_float64(backend):
    cfg = moe_cfg(hidden_size=6, moe_intermediate_size=3, n_routed_experts=4, num_experts_per_tok=2,
                  n_group=2, topk_group=2, n_shared_experts=1, route_scale=2.5, seq_aux_alpha=0.1, init_std=0.5)
    torch.manual_seed(6)
    moe = MoE(cfg).double().train()
    moe.gate.bias.copy_(torch.tensor([0.1, -0.1, 0.05, 0.0]))
    x = torch.randn(1, 3, cfg.hidden_size, dtype=torch.float64)
    # the native router computes float64 logits in float64: everything is checked. The torch
    # reference router rounds its weights to float32 by design, so there the router and the input
    # stay fixed and the experts, the shared expert and the balance loss are checked.
    full = backend == "native"
    names = [n for n, _ in moe.named_parameters() if full or not n.startswith("gate.")]
    params = [p.detach().clone().requires_grad_(True) for n, p in moe.named_parameters() if n in names]
    x.requires_grad_(full)

    def f(x, *ps):
        y, aux = functional_call(moe, dict(zip(names, ps)), (x,), strict=False)
        return y, aux

    y, aux = f(x, *params)
    assert y.dtype == torch.float64 and aux.dtype == torch.float64 and aux.item() > 0
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_decode_batch_padded_experts_equal_the_per_token_loop(backend, monkeypatch):
    """A mid-sized decode batch on CPU (64 < rows <= 512, no autograd) runs the experts padded
    into batched matmuls: the same outputs as the per-token float64 loop, an expert left empty."""
    from megads.ops import grouped

    cfg = moe_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, route_scale=2.5)
    torch.manual_seed(7)
    moe = MoE(cfg).eval()
    moe.gate.bias.zero_()
    moe.gate.bias[5] = -100.0  # expert 5 is never chosen
    calls = []
    real = grouped._padded_swiglu
    monkeypatch.setattr(grouped, "_padded_swiglu", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(grouped, "SWIGLU_ROWS", 0)  # not the native few-row kernel (tests/ops/test_native_rows.py)
    x = torch.randn(5, 8, cfg.hidden_size)  # 40 tokens x 3 = 120 expert rows
    with torch.no_grad():
        y, _ = moe(x)
    assert calls == [120] and moe.last_counts[5] == 0
    torch.testing.assert_close(y.double(), per_token_reference(moe, x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        y64, _ = moe.double()(x.double())
    tol = dict(rtol=1e-9, atol=1e-10) if backend == "native" else dict(rtol=1e-6, atol=1e-7)  # as above
    torch.testing.assert_close(y64, per_token_reference(moe, x), **tol)
    assert calls == [120, 120]
    with torch.enable_grad():  # training keeps the grouped products
        moe.float()(x)
    assert calls == [120, 120]


def test_padded_experts_compile_to_one_graph():
    """Under torch.compile the padded product is one opaque op (its shapes depend on the routing)."""
    import torch._dynamo

    E, N, D, inter = 4, 80, 8, 6
    g = torch.Generator().manual_seed(3)
    w1, w3 = torch.randn(E, inter, D, generator=g), torch.randn(E, inter, D, generator=g)
    w2 = torch.randn(E, D, inter, generator=g)
    x = torch.randn(N, D, generator=g)
    offsets = torch.tensor([0, 30, 30, 55, N])

    def ref(x):
        rows = []
        for e in range(E):
            xe = x[offsets[e]:offsets[e + 1]].double()
            rows.append((F.silu(xe @ w1[e].double().T) * (xe @ w3[e].double().T)) @ w2[e].double().T)
        return torch.cat(rows)

    torch._dynamo.reset()
    f = torch.compile(lambda x: ops.grouped_swiglu(x, w1, w3, w2, offsets), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(f(x).double(), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.grouped_swiglu(x, w1, w3, w2, offsets).double(), ref(x), rtol=1e-5, atol=1e-5)
