"""DeepSeekMoE: fine-grained routed experts + shared experts, auxiliary-loss-free balancing.

gate:    s_i = sigmoid(u.e_i) (V3) or softmax (V2); selection by s_i + b_i, group-limited;
         weights from the unbiased s_i of the chosen experts, normalised, times route_scale.
balance: after each optimizer step, b_i += gamma * sign(mean_load - load_i) from the step's
         (globally reduced) token counts; optional sequence-wise loss alpha * sum_i f_i P_i.
experts: tokens sorted by expert and pushed through grouped matmuls; no token is dropped.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megads import ops
from megads.config import ModelConfig
from megads.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, copy_to_tp, gather_from_tp, group_rank,
                                    group_size, normal_init_, reduce_from_tp, scaled_init_std,
                                    scatter_to_tp)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), split over TP (w1/w3 column, w2 row)."""

    def __init__(self, dim: int, inter: int, cfg: ModelConfig, tp_group=None, sequence_parallel=False):
        super().__init__()
        kw = dict(tp_group=tp_group, sequence_parallel=sequence_parallel)
        self.w1 = ColumnParallelLinear(dim, inter, std=cfg.init_std, **kw)
        self.w3 = ColumnParallelLinear(dim, inter, std=cfg.init_std, **kw)
        self.w2 = RowParallelLinear(inter, dim, std=scaled_init_std(cfg.init_std, cfg.num_layers), **kw)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router: logits u.e_i in float32, routed through megads.ops.route (native or torch)."""

    def __init__(self, cfg: ModelConfig, node_limit: tuple[int, int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.node_limit = node_limit  # (EP nodes, max nodes per token) for node-limited routing
        self.partial_group = None  # set under sequence parallelism (see MoE)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        normal_init_(self.weight, cfg.init_std)
        self.param_init = {"weight": cfg.init_std}
        # the balancing bias is state, not a parameter: the trainer updates it, never the optimizer
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.router_bias else None)

    def init_buffers(self) -> None:
        """A new model's router biases are zero (after building on the meta device)."""
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):
        """x [T, D] -> weights [T, k] float32, indices [T, k], counts [E], logits [T, E]."""
        c = self.cfg
        dt = torch.promote_types(x.dtype, torch.float32)  # at least float32 (float64 stays float64)
        weight = copy_to_tp(self.weight, self.partial_group) if self.partial_group is not None else self.weight
        logits = F.linear(x.to(dt), weight.to(dt))
        if self.node_limit is not None:  # the mask is a reference-path feature
            nodes, m = self.node_limit
            mask = ops.reference.node_limit_mask(logits, self.bias, num_nodes=nodes, max_nodes=m,
                                                 top_k=c.num_experts_per_tok, score_func=c.score_func)
            w, idx, counts = ops.reference.route(
                logits, self.bias, top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                score_func=c.score_func, route_scale=c.route_scale, norm_topk_prob=c.norm_topk_prob,
                expert_mask=mask)
            return w, idx, counts, logits
        w, idx, counts = ops.route(logits, self.bias, top_k=c.num_experts_per_tok, n_group=c.n_group,
                                   topk_group=c.topk_group, score_func=c.score_func,
                                   route_scale=c.route_scale, norm_topk_prob=c.norm_topk_prob)
        return w, idx, counts, logits


class Experts(nn.Module):
    """A stack of SwiGLU experts stored as [E, out, in] tensors for grouped matmuls."""

    def __init__(self, num_experts: int, dim: int, inter: int, cfg: ModelConfig):
        super().__init__()
        self.num_experts = num_experts
        self.partial_group = None  # TP group when replicated experts see sequence-parallel chunks
        self.w1 = nn.Parameter(torch.empty(num_experts, inter, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, inter))
        normal_init_(self.w1, cfg.init_std)
        normal_init_(self.w3, cfg.init_std)
        normal_init_(self.w2, scaled_init_std(cfg.init_std, cfg.num_layers))
        self.param_init = {"w1": cfg.init_std, "w3": cfg.init_std, "w2": scaled_init_std(cfg.init_std, cfg.num_layers)}

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, D] rows grouped by expert (offsets [E+1]) -> [N, D]."""
        if getattr(self, "w1_int8", None) is not None:  # megads.model.quant.quantize_int8 (decoding)
            from megads.model.quant import grouped_int8

            g1 = grouped_int8(x_sorted, self.w1_int8, self.w1_scale, offsets)
            h = F.silu(g1) * grouped_int8(x_sorted, self.w3_int8, self.w3_scale, offsets)
            return grouped_int8(h, self.w2_int8, self.w2_scale, offsets)
        w1, w2, w3 = self.w1, self.w2, self.w3
        if self.partial_group is not None:
            w1, w2, w3 = (copy_to_tp(w, self.partial_group) for w in (w1, w2, w3))
        return ops.grouped_swiglu(x_sorted, w1, w3, w2, offsets)


class LocalDispatcher:
    """All experts on this rank: permute, grouped experts, weighted unpermute."""

    def __call__(self, x, weights, indices, experts: Experts):
        x_sorted, offsets, state = ops.permute(x, indices, experts.num_experts)
        y_sorted = experts(x_sorted, offsets)
        return ops.unpermute(y_sorted, weights.to(x.dtype), state)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel=False, dispatcher=None,
                 num_local_experts: int | None = None, token_split: bool = False,
                 node_limit: tuple[int, int] | None = None):
        super().__init__()
        self.cfg = cfg
        # under TP+EP (no SP) the TP ranks hold the same tokens: each dispatches its 1/tp share
        self.split_group = tp_group if token_split else None
        self.gate = Gate(cfg, node_limit)
        self.experts = Experts(num_local_experts or cfg.n_routed_experts, cfg.hidden_size,
                               cfg.moe_intermediate_size, cfg)
        self.shared = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, cfg, tp_group,
                           sequence_parallel) if cfg.n_shared_experts else None)
        self.dispatcher = dispatcher or LocalDispatcher()
        # sequence parallel: each TP rank routes its own sequence chunk, so the router (and
        # experts replicated over TP) get partial gradients, summed over TP in backward
        self.sp_group = tp_group if sequence_parallel and group_size(tp_group) > 1 else None
        self.gate.partial_group = self.sp_group
        self.experts.partial_group = self.sp_group if dispatcher is None else None
        self.last_counts: torch.Tensor | None = None  # tokens per expert of the last forward
        self.last_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                seq_groups: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> (y [B, S, D], sequence-wise balance loss (0 when alpha = 0)).

        token_mask [B, S_full] (packed SFT rows: False on padding): padding is still routed (its
        output is never used) but not counted in the expert loads that drive the bias update. A
        float token_mask weighs each position (the number of sequences it stands for). seq_groups
        (prefix, group): each row holds `group` sequences sharing its first `prefix` positions
        (Transformer.forward's shared_prefix); the sequence-wise loss is taken over those."""
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        weights, indices, counts, logits = self.gate(flat)
        if token_mask is not None:
            if self.sp_group is not None:  # this rank's sequence chunk
                token_mask = token_mask.chunk(group_size(self.sp_group), dim=1)[group_rank(self.sp_group)]
            keep = token_mask.reshape(B * S)
            E = self.cfg.n_routed_experts
            if keep.dtype == torch.bool:
                kept = torch.bincount(indices[keep].reshape(-1), minlength=E)
            else:  # whole numbers of sequences per position
                kept = torch.bincount(indices.reshape(-1), keep.repeat_interleave(indices.shape[1]).double(),
                                      minlength=E).round()
            counts = kept.to(counts.dtype)
        self.last_counts = counts.detach()
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.cfg.seq_aux_alpha > 0:
            scores = ops.router_scores(logits, self.cfg.score_func)
            k, E = self.cfg.num_experts_per_tok, self.cfg.n_routed_experts
            hits, p_sum = ops.reference.balance_loss_sums(scores, indices, B, k, seq_groups)
            seq = S if seq_groups is None else seq_groups[0] + (S - seq_groups[0]) // seq_groups[1]
            if self.sp_group is not None:  # add up the sequence chunks of the TP ranks
                hits = hits.detach().clone()
                torch.distributed.all_reduce(hits, group=self.sp_group)
                p_sum = reduce_from_tp(p_sum, self.sp_group)
                seq = S * group_size(self.sp_group)
            aux = self.cfg.seq_aux_alpha * ops.reference.balance_loss_from_sums(hits, p_sum, seq, E, k)
        if self.training and self.cfg.aux_loss_alpha > 0:  # the classic expert-level loss (model/balance.py)
            aux = aux + self._expert_balance_loss(logits, indices, token_mask)
        if self.split_group is not None:
            n, r = group_size(self.split_group), group_rank(self.split_group)
            pad = -flat.shape[0] % n  # e.g. a prefill of an odd number of tokens: zero-weight rows
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad, D)])
                weights = torch.cat([weights, weights.new_zeros(pad, weights.shape[1])])
                indices = torch.cat([indices, indices[:1].expand(pad, -1)])
            mine = self.dispatcher(scatter_to_tp(flat, self.split_group, dim=0),
                                   scatter_to_tp(weights, self.split_group, dim=0),
                                   indices.chunk(n, dim=0)[r], self.experts)
            y = gather_from_tp(mine, self.split_group, dim=0)[:B * S].view(B, S, D)
        else:
            y = self.dispatcher(flat, weights, indices, self.experts).view(B, S, D)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, aux

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing: b_i += gamma * sign(mean_load - load_i).

        counts: [E] tokens per expert of the whole (global) batch of one optimizer step.
        """
        if self.gate.bias is None or self.cfg.bias_update_speed == 0:
            return
        load = counts.to(self.gate.bias.device, torch.float32)
        self.gate.bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)

    def _expert_balance_loss(self, logits: torch.Tensor, indices: torch.Tensor,
                             token_mask: torch.Tensor | None) -> torch.Tensor:
        """aux_loss_alpha * sum_i f_i P_i over this micro-batch's tokens (padding left out; the
        sequence-parallel chunks of the TP ranks added up). logits [T, E], indices [T, k]."""
        from megads.model.balance import expert_balance_loss

        keep = token_mask.reshape(-1) if token_mask is not None else None
        scores = ops.router_scores(logits, self.cfg.score_func)
        loss = expert_balance_loss(scores, indices, self.cfg.n_routed_experts, self.cfg.num_experts_per_tok,
                                   keep, self.sp_group)
        return self.cfg.aux_loss_alpha * loss.float()
