"""Pure-torch reference implementations of the MoE routing and token-dispatch ops.

These are the definition of correct for the native kernels in csrc/ (tests compare the two on
random inputs) and the path CPU-only users fall back to. Tie rule, shared with the kernels:
whenever two scores are equal, the lower expert (or group) index wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "sigmoid",
    route_scale: float = 1.0,
    norm_topk_prob: bool = True,
    expert_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek gate: scores, biased group-limited top-k selection, unbiased weights.

    expert_mask: optional [T, E] bool of experts a token may choose (node-limited routing).

    logits: [T, E] router logits. bias: [E] (used for selection only) or None.
    Returns weights [T, k] float32 (differentiable w.r.t. logits), indices [T, k] int64,
    counts [E] int64 (tokens per expert).
    """
    T, E = logits.shape
    if score_func == "sigmoid":
        scores = torch.sigmoid(logits.float())
    elif score_func == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    else:
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    sel = scores.detach()
    if bias is not None:
        sel = sel + bias.float()
    if expert_mask is not None:
        sel = sel.masked_fill(~expert_mask, float("-inf"))
    if n_group > 1:
        grouped = sel.view(T, n_group, E // n_group)  # [T, G, E/G]
        if bias is not None:
            # group score = sum of the group's top-2 biased scores (V3)
            group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)  # V2: max
        keep = _stable_topk_indices(group_scores, topk_group)  # [T, topk_group]
        drop = torch.ones(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        sel = sel.masked_fill(drop.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E), float("-inf"))
    indices = _stable_topk_indices(sel, top_k)  # [T, k]
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * route_scale
    counts = torch.bincount(indices.reshape(-1), minlength=E)
    return weights, indices, counts


@dataclass
class PermuteState:
    """What unpermute needs to put expert outputs back in token order."""

    order: torch.Tensor  # [T*k] int64: flat (token, slot) position of each sorted row
    token_of: torch.Tensor  # [T*k] int64: source token of each sorted row
    num_tokens: int
    top_k: int


def permute(
    x: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, PermuteState]:
    """Copy each token once per chosen expert, in expert-contiguous order (stable).

    x: [T, H]; indices: [T, k]. Returns x_sorted [T*k, H], offsets [E+1] int64 (rows of expert
    e are x_sorted[offsets[e]:offsets[e+1]]), and the state for unpermute.
    """
    T, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # [T*k]
    token_of = torch.div(order, k, rounding_mode="floor")
    x_sorted = x.index_select(0, token_of)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return x_sorted, offsets, PermuteState(order, token_of, T, k)


def unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """Weighted combine of expert outputs back into token order.

    y_sorted: [T*k, H] in permuted order; weights: [T, k]. Returns y [T, H] in y_sorted's dtype,
    accumulated in float32 (float64 for float64 inputs).
    """
    acc = torch.promote_types(y_sorted.dtype, torch.float32)
    w_sorted = weights.reshape(-1).index_select(0, state.order).to(acc)  # [T*k]
    contrib = y_sorted.to(acc) * w_sorted.unsqueeze(-1)
    out = torch.zeros(state.num_tokens, y_sorted.shape[-1], dtype=acc, device=y_sorted.device)
    out = out.index_add(0, state.token_of, contrib)
    return out.to(y_sorted.dtype)


def balance_loss_sums(scores: torch.Tensor, indices: torch.Tensor, batch: int, top_k: int,
                      seq_groups: tuple[int, int] | None = None):
    """Per-sequence sums behind the balance loss: (hits [B, E], summed normalised scores [B, E]).
    Sums, so sequence-parallel chunks can add theirs up. seq_groups (prefix, group): each of the
    `batch` rows holds `group` sequences [its first `prefix` positions | their own segment of
    (S - prefix) / group positions]; the sums are then per sequence, [B * group, E]."""
    T, E = scores.shape
    S = T // batch
    norm = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    if seq_groups is not None:
        prefix, group = seq_groups
        hit = torch.zeros(T, E, device=scores.device, dtype=scores.dtype)
        hit.scatter_add_(1, indices, torch.ones_like(indices, dtype=scores.dtype))

        def per_sequence(t):  # [T, E] -> [B * group, E]: the prefix's sum added to each segment's
            t = t.view(batch, S, E)
            segs = t[:, prefix:].reshape(batch, group, (S - prefix) // group, E).sum(2)
            return (segs + t[:, :prefix].sum(1, keepdim=True)).reshape(batch * group, E)

        return per_sequence(hit), per_sequence(norm)
    p_sum = norm.view(batch, S, E).sum(1)
    hits = torch.zeros(batch, E, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(1, indices.reshape(batch, S * top_k),
                      torch.ones(batch, S * top_k, device=scores.device, dtype=scores.dtype))
    return hits, p_sum


def balance_loss_from_sums(hits, p_sum, seq_len: int, num_experts: int, top_k: int) -> torch.Tensor:
    f = hits * (num_experts / (top_k * seq_len))
    return (f * (p_sum / seq_len)).sum(-1).mean()


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, batch: int, num_experts: int, top_k: int
) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.

    scores: [B*S, E] unbiased router scores; indices: [B*S, k]. f_i = E/(k*S) * #tokens of the
    sequence routed to i; P_i = mean over the sequence of the normalised score of expert i.
    """
    hits, p_sum = balance_loss_sums(scores, indices, batch, top_k)
    return balance_loss_from_sums(hits, p_sum, scores.shape[0] // batch, num_experts, top_k)


def node_limit_mask(logits: torch.Tensor, bias: torch.Tensor | None, *, num_nodes: int, max_nodes: int,
                    top_k: int, score_func: str) -> torch.Tensor:
    """Node-limited routing (V3): experts are laid out contiguously over `num_nodes` nodes; each
    token keeps the `max_nodes` nodes with the largest sum of their top ceil(k/M) biased scores.
    Returns the [T, E] bool mask of the experts on kept nodes."""
    T, E = logits.shape
    sel = router_scores(logits, score_func).detach()
    if bias is not None:
        sel = sel + bias.to(sel.dtype)
    per_node = sel.view(T, num_nodes, E // num_nodes)
    m = min(-(-top_k // max_nodes), E // num_nodes)
    node_scores = per_node.topk(m, dim=-1).values.sum(-1)  # [T, nodes]
    keep = _stable_topk_indices(node_scores, max_nodes)
    mask = torch.zeros(T, num_nodes, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
    return mask.unsqueeze(-1).expand(T, num_nodes, E // num_nodes).reshape(T, E)


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Unbiased router scores in float32 ([T, E]); float64 logits give float64 scores."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.sigmoid(x) if score_func == "sigmoid" else F.softmax(x, dim=-1)
