"""The classic expert-level auxiliary balance loss (Switch Transformer, GShard; DeepSeekMoE's
L_ExpBal, DeepSeek-V2 §2.2.3): the baseline the auxiliary-loss-free bias is compared with.

    L = alpha * sum_i f_i * P_i
    f_i = E / (K * T) * #{tokens t routed to expert i}     (not differentiable: counts)
    P_i = 1 / T * sum_t s'_{i,t}                            (the gradient flows through P_i)

over the T tokens of a micro-batch (Megatron's micro-batch-level aux loss), with s' the router
scores normalised over the experts (softmax probabilities as they are; sigmoid scores divided by
their sum, as DeepSeek-V3 does for its sequence-wise loss). f_i = P_i = 1/E for a perfectly
balanced router gives L = alpha. Padding tokens (a token mask) are left out of T, f and P.

Every layout gives the single process's value at equal micro_batch_size: data-parallel and
expert-parallel ranks hold whole micro-batches, tensor-parallel ranks the same tokens, and under
sequence parallelism the TP ranks' sums are added up before the loss is formed.
"""
from __future__ import annotations

import torch

from megads.parallel.tensor import group_size, reduce_from_tp


def expert_balance_sums(scores: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None = None):
    """scores [T, E] unbiased router scores, indices [T, K] chosen experts, keep [T] bool or None
    -> (hits [E] tokens routed to each expert, p_sum [E] summed normalised scores, tokens counted).
    Sums, so sequence-parallel chunks can add theirs up."""
    T, E = scores.shape
    norm = scores / (scores.sum(-1, keepdim=True) + 1e-20)  # [T, E]
    w = torch.ones(T, dtype=scores.dtype, device=scores.device) if keep is None else keep.to(scores.dtype)
    p_sum = (norm * w.unsqueeze(-1)).sum(0)  # [E]
    hits = torch.zeros(E, dtype=scores.dtype, device=scores.device)
    hits.scatter_add_(0, indices.reshape(-1), w.repeat_interleave(indices.shape[1]))
    return hits.detach(), p_sum, w.sum().detach()


def expert_balance_loss_from_sums(hits: torch.Tensor, p_sum: torch.Tensor, tokens: torch.Tensor,
                                  num_experts: int, top_k: int) -> torch.Tensor:
    """sum_i f_i P_i from the sums of `expert_balance_sums` (0 when no token was counted)."""
    n = tokens.clamp_min(1)
    f = hits * (num_experts / (top_k * n))
    return (f * (p_sum / n)).sum()


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int, top_k: int,
                        keep: torch.Tensor | None = None, sp_group=None) -> torch.Tensor:
    """sum_i f_i P_i over the tokens of `scores` [T, E] (and, with sp_group, of the other
    sequence-parallel chunks); multiply by alpha for the loss."""
    hits, p_sum, n = expert_balance_sums(scores, indices, keep)
    if group_size(sp_group) > 1:
        both = torch.cat([hits, n.reshape(1)]).clone()
        torch.distributed.all_reduce(both, group=sp_group)
        hits, n = both[:-1], both[-1]
        p_sum = reduce_from_tp(p_sum, sp_group)
    return expert_balance_loss_from_sums(hits, p_sum, n, num_experts, top_k)
