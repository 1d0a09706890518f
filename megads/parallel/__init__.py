"""Megatron-style parallelism: process groups (state.py), TP/SP layers (tensor.py), expert
dispatch (expert.py). `build_model_par` hands the model what it needs from them."""
from __future__ import annotations


def build_model_par(cfg, ps) -> dict:
    """The `par` dict Transformer takes: TP group, sequence parallelism, expert dispatcher."""
    par = {"tp_group": ps.group("tp") if ps.layout.tp > 1 else None,
           "sequence_parallel": cfg.parallel.sequence_parallel and ps.layout.tp > 1}
    return par
