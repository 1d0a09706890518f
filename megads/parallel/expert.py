"""Expert parallelism: routed experts sharded over the EP group, tokens moved by all-to-all.

Per MoE layer: permute tokens by global expert (megads.ops.permute), exchange per-expert counts,
all-to-all the rows to the ranks owning their experts (variable splits), regroup them by local
expert, run the grouped experts, and send the outputs back the same way; the weighted combine
(megads.ops.unpermute) happens on the token's own rank. Both all-to-alls are differentiable.
Dropless: every routed copy is computed.

Gradients: expert parameters are marked for DeepSpeed as expert parameters (`allreduce=False`,
`group_name`) and registered with our EDP group, so DeepSpeed reduces them over EDP only,
divided by the data-parallel size (each expert already summed the contributions of every rank
that sent it tokens), i.e. no ep-times error; dense gradients reduce over DP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads import ops


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        gi = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gi, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gi, None, None, None


def all_to_all(x, out_splits, in_splits, group):
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """Dispatcher for MoE with experts sharded over `ep_group` (ep ranks, E/ep experts each).

    ranks_per_node: EP ranks sharing a node, for the cross-node volume figure.
    """

    def __init__(self, ep_group, num_experts: int, ranks_per_node: int = 0):
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        self.rank = dist.get_rank(ep_group)
        self.num_experts = num_experts
        self.ranks_per_node = ranks_per_node or self.ep
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"tokens": 0, "bytes_sent_remote": 0, "bytes_sent_internode": 0, "bytes_internode_dedup": 0}

    def __call__(self, x, weights, indices, experts):
        E, ep = self.num_experts, self.ep
        El = E // ep
        x_sorted, offsets, state = ops.permute(x, indices, E)
        counts = (offsets[1:] - offsets[:-1]).to(torch.int64)  # [E] rows for each global expert
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [ep * El]: (source, local expert)
        send = counts.view(ep, El).sum(1)
        recv = recv_counts.view(ep, El)
        send_splits, recv_splits = send.tolist(), recv.sum(1).tolist()  # the one host sync per layer
        self._account(send_splits, x, indices)
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, self.group)  # by source, then local expert
        idx, local_offsets = _source_major_to_expert_major(recv, sum(recv_splits))
        y_local = experts(x_recv.index_select(0, idx), local_offsets)
        y_recv = y_local.index_select(0, torch.argsort(idx))  # back to source-major order
        y_sorted = all_to_all(y_recv, send_splits, recv_splits, self.group)
        return ops.unpermute(y_sorted, weights.to(x.dtype), state)

    def _account(self, send_splits, x, indices):
        """Bytes this rank sends: per routed copy to other ranks / other nodes, and the volume a
        node-deduplicating (DeepEP-style) dispatch would send across nodes: one row per distinct
        remote node of each token."""
        row = x.shape[-1] * x.element_size()
        me_node = self.rank // self.ranks_per_node
        nodes = max(1, self.ep // self.ranks_per_node)
        node_of = indices // (self.num_experts // nodes)  # [T, k]
        hit = torch.zeros(indices.shape[0], nodes, dtype=torch.bool, device=indices.device)
        hit.scatter_(1, node_of, True)
        hit[:, me_node] = False
        self.stats["bytes_internode_dedup"] += hit.sum() * row  # a tensor: read once per log step, not per layer
        self.stats["tokens"] += x.shape[0]
        for r, n in enumerate(send_splits):
            if r != self.rank:
                self.stats["bytes_sent_remote"] += n * row
                if r // self.ranks_per_node != me_node:
                    self.stats["bytes_sent_internode"] += n * row


def _source_major_to_expert_major(recv: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """recv [ep, El] rows per (source, local expert), laid out source-major; total: their sum
    (known on the host from the splits: no second sync). Returns the gather index putting them
    expert-major (stable in source order) and the local expert offsets."""
    ep, El = recv.shape
    flat = recv.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # start of each (s, e) segment, source-major
    order = torch.arange(ep * El, device=recv.device).view(ep, El).t().reshape(-1)  # (e, s)
    seg_len, seg_start = flat[order], starts[order]
    new_starts = torch.cumsum(seg_len, 0) - seg_len
    idx = torch.repeat_interleave(seg_start - new_starts, seg_len, output_size=total) + torch.arange(
        total, device=recv.device)
    local_counts = recv.sum(0)
    offsets = torch.zeros(El + 1, dtype=torch.int64, device=recv.device)
    offsets[1:] = torch.cumsum(local_counts, 0)
    return idx, offsets


# ---------------------------------------------------------------- DeepSpeed registration



def mark_expert_params(model, ps) -> str:
    """Tag routed-expert parameters as DeepSpeed expert parameters, register our EP/EDP groups
    under one name in deepspeed.utils.groups, and attach a marker so the engine enables its MoE
    gradient path. Returns the group name."""
    from deepspeed.utils import groups

    name = f"ep_size_{ps.layout.ep}"  # DeepSpeed parses this name format
    for m in model.moe_layers():
        for p in m.experts.parameters():
            p.allreduce = False
            p.group_name = name
    groups._EXPERT_PARALLEL_GROUP[name] = ps.group("ep")
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = ps.group("edp")
    coords = ps.layout.groups()
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = next(g for g in coords["ep"] if ps.rank in g)
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = next(g for g in coords["edp"] if ps.rank in g)
    model.add_module("_deepspeed_moe_marker", _marker(ps.layout.ep, model.cfg.n_routed_experts, name))
    return name


def _marker(ep_size: int, num_experts: int, name: str):
    """A parameter-less module DeepSpeed's engine recognises as an MoE layer."""
    import torch.nn as nn
    from deepspeed.moe.layer import MoE as _DSMoE

    class DeepSpeedMoEMarker(_DSMoE):
        def __init__(self):
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = name

        def set_deepspeed_parallelism(self, *args, **kwargs):  # our groups are already registered
            return None

        def forward(self, *args, **kwargs):  # never called
            raise RuntimeError("marker module")

    return DeepSpeedMoEMarker()


def expert_param_groups(groups: list[dict], name: str) -> list[dict]:
    """Split optimizer param groups into dense and expert ('moe': True) groups for ZeRO."""
    out = []
    for g in groups:
        dense = [p for p in g["params"] if getattr(p, "allreduce", True)]
        expert = [p for p in g["params"] if not getattr(p, "allreduce", True)]
        base = {k: v for k, v in g.items() if k != "params"}
        if dense:
            out.append({**base, "params": dense})
        if expert:
            out.append({**base, "params": expert, "moe": True, "name": name})
    return out
