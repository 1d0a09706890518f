"""The global gradient norm of a sharded model, equal to the single process's in every layout.

The norm clipping uses is that of the one full gradient the single process would have: every
distinct gradient element counted once. A rank holds three kinds of parameter:

- TP-sharded (column/row-parallel weights, the vocab-parallel embedding and head): distinct over
  TP, identical over DP;
- replicated (norms, the router, everything else): identical over TP and DP;
- routed experts under EP: distinct over EP, identical over EDP (= TP·DP/EP).

Each rank sums `w_p · ||g_p||²` with `w_p = 1 / (number of ranks holding the same elements)`, and
one all-reduce over the world gives the norm². Without ZeRO the optimizer sees whole gradients
(`zero0_weights`); with ZeRO-1/2 each rank holds a DP (or, for experts, EDP) partition of its own
flat buffer, so the weights are 1, 1/tp and 1 (`zero_weights`), and DeepSpeed's
`get_grad_norm_direct` is replaced by the weighted sum (`patch_zero_norm`; DeepSpeed's own counts
sharded parameters only where they carry `tensor_model_parallel`, and reduces over DP only).

Also sets `tensor_model_parallel = True` on TP-sharded parameters, the attribute DeepSpeed's other
norm paths (the bf16 optimizer) read.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist


def classify(model, specs: dict, tp: int, ep: int) -> dict:
    """param -> 'tp' | 'expert' | 'replicated'; marks TP-sharded ones for DeepSpeed."""
    out = {}
    for name, p in model.named_parameters():
        kind = specs.get(name, (None,))[0]
        if kind == "tp" and tp > 1:
            p.tensor_model_parallel = True
            out[p] = "tp"
        elif kind == "ep" and ep > 1:
            out[p] = "expert"
        else:
            out[p] = "replicated"
    return out


def zero0_weights(kinds: dict, layout, copy=None) -> dict:
    """1 / replicas of each whole parameter (no ZeRO: every rank holds whole gradients). `copy`:
    the last pipeline stage's copy of the embedding, counted 0 (the first stage counts it)."""
    reps = {"tp": layout.dp, "replicated": layout.tp * layout.dp, "expert": layout.edp}
    return {p: (0.0 if p is copy else 1.0 / reps[k]) for p, k in kinds.items()}


def zero_weights(kinds: dict, layout, copy=None) -> dict:
    """1 / replicas of a ZeRO-1/2 partition element: partitions are disjoint over DP (EDP for
    experts); only replicated parameters repeat, once per TP rank."""
    return {p: (0.0 if p is copy else 1.0 / layout.tp if k == "replicated" else 1.0) for p, k in kinds.items()}


def weighted_sq_norm(pairs, weights: dict, device) -> torch.Tensor:
    """Σ w_p ||g_p||² over (grad, param) pairs: each gradient's norm in its own dtype, at least
    float32 (torch's vector norm: one pass, no copy; converting every gradient to float64 took ~4%
    of a small-preset step on CPU, bench/RESULTS.md), their squares summed in float64. A float32
    gradient norm past float32's range (~1.8e19) reads as inf, i.e. non-finite, as in DeepSpeed's
    and Megatron's float32 norms."""
    by_weight: dict[float, list] = {}  # a few distinct weights (1, 1/dp, 1/(tp dp), 1/edp, 0)
    for g, p in pairs:
        if g is None:
            continue
        norm = torch.linalg.vector_norm(g.detach(), dtype=torch.promote_types(g.dtype, torch.float32))
        by_weight.setdefault(float(weights.get(p, 1.0)), []).append(norm.to(device=device, dtype=torch.float64))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for w, norms in by_weight.items():
        total = total + w * torch.stack(norms).square().sum()
    return total


def global_norm(pairs, weights: dict, device) -> torch.Tensor:
    """Collective over the world: the single-process gradient norm (float32 scalar tensor;
    non-finite when any rank's gradient is)."""
    sq = weighted_sq_norm(pairs, weights, device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt().float()


def patch_zero_norm(zero_optimizer, weights: dict) -> None:
    """Make a DeepSpeed ZeRO-1/2 optimizer compute the single-process norm. Its per-group norms
    are combined as sqrt(Σ n_g²) and, for expert groups, averaged over EDP ranks that now all hold
    the same value, so each group's weighted world sum is exactly what it needs."""

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            raise ValueError("megads computes the L2 gradient norm only")
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        device = grads[0].device if grads else torch.device("cpu")
        return global_norm(zip(grads, params), weights, device)

    zero_optimizer.get_grad_norm_direct = types.MethodType(get_grad_norm_direct, zero_optimizer)
