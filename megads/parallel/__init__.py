"""Megatron-style parallelism: process groups (state.py), TP/SP layers (tensor.py), expert
dispatch (expert.py), full<->sharded weights (shard.py). `build_model_par` hands the model what it
needs from them."""
from __future__ import annotations


def build_model_par(cfg, ps) -> dict:
    """The `par` dict Transformer takes: TP group, sequence parallelism, expert dispatcher."""
    tp, ep = ps.layout.tp, ps.layout.ep
    sp = cfg.parallel.sequence_parallel and tp > 1
    par = {"tp_group": ps.group("tp") if tp > 1 else None, "sequence_parallel": sp}
    if ep > 1 and cfg.model.n_routed_experts:
        import os

        from megads.parallel.expert import AllToAllDispatcher

        per_node = cfg.parallel.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", ep))
        per_node = max(1, min(per_node, ep))
        par["dispatcher"] = AllToAllDispatcher(ps.group("ep"), cfg.model.n_routed_experts, per_node)
        par["num_local_experts"] = cfg.model.n_routed_experts // ep
        # TP ranks hold identical tokens (without SP): each routes its 1/tp share through EP
        par["moe_token_split"] = tp > 1 and not sp
        nodes = max(1, ep // per_node)
        if cfg.parallel.node_limit and nodes > cfg.parallel.node_limit:
            par["node_limit"] = (nodes, cfg.parallel.node_limit)
    return par
