"""Full (single-process) weights <-> this rank's shards, by layer type.

Column-parallel weights split their rows, row-parallel their columns, the vocab-parallel
embedding its rows, routed experts their expert dim over EP; everything else is replicated.
Used to start every layout from the same weights as the single process, and to gather a
layout's weights back for comparison and export.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads.model.moe import Experts
from megads.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def shard_specs(model) -> dict[str, tuple[str, int]]:
    """param name -> ('tp' | 'ep', dim) for every sharded parameter of `model`."""
    specs = {}
    for mname, m in model.named_modules():
        pre = f"{mname}." if mname else ""
        if isinstance(m, ColumnParallelLinear):
            specs[pre + "weight"] = ("tp", 0)
        elif isinstance(m, RowParallelLinear):
            specs[pre + "weight"] = ("tp", 1)
        elif isinstance(m, VocabParallelEmbedding):
            specs[pre + "weight"] = ("tp", 0)
        elif isinstance(m, Experts):
            for n in ("w1", "w2", "w3"):
                specs[pre + n] = ("ep", 0)
    return specs


def shard_slices(model, ps) -> dict[str, tuple[int, int, int]]:
    """param name -> (dim, start, full length) of this rank's slice, for every parameter it holds
    a slice of (TP shards, its routed experts under EP); the others are whole."""
    sizes = {"tp": (ps.layout.tp, ps.tp_rank), "ep": (ps.layout.ep, ps.ep_rank)}
    local = dict(model.named_parameters())
    out = {}
    for name, (kind, dim) in shard_specs(model).items():
        n, r = sizes[kind]
        if n > 1 and name in local:
            size = local[name].shape[dim]
            out[name] = (dim, r * size, n * size)
    return out


def load_full_state(model, full: dict, ps) -> None:
    """Copy this rank's slices of the full state dict into the (sharded) model."""
    specs = shard_specs(model)
    own = model.state_dict()
    sizes = {"tp": (ps.layout.tp, ps.tp_rank), "ep": (ps.layout.ep, ps.ep_rank)}
    with torch.no_grad():
        for name, t in own.items():
            src = full[name]
            if name in specs:
                kind, dim = specs[name]
                n, r = sizes[kind]
                src = src.chunk(n, dim=dim)[r]
            if src.shape != t.shape:
                raise ValueError(f"shard of {name}: {tuple(src.shape)} != {tuple(t.shape)}")
            t.copy_(src)


def gather_full_state(model, ps) -> dict:
    """Collective over the TP and EP groups: the full state dict, on every rank."""
    specs = shard_specs(model)
    groups = {"tp": ps.group("tp"), "ep": ps.group("ep")}
    sizes = {"tp": ps.layout.tp, "ep": ps.layout.ep}
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("_deepspeed"):
            continue
        t = t.detach()
        if name in specs and sizes[specs[name][0]] > 1:
            kind, dim = specs[name]
            parts = [torch.empty_like(t) for _ in range(sizes[kind])]
            dist.all_gather(parts, t.contiguous(), group=groups[kind])
            t = torch.cat(parts, dim=dim)
        out[name] = t.clone()
    return out


def load_shards_from_safetensors(model, file, ps, skip=()) -> None:
    """Fill this rank's shards straight from a full-model safetensors file: each tensor is read
    sliced (safetensors reads only the bytes of the slice), so no rank holds the full model.
    Every parameter and buffer of `model` must be in the file (a tied head excepted)."""
    from safetensors import safe_open

    from megads.errors import CheckpointError

    specs = shard_specs(model)
    sizes = {"tp": (ps.layout.tp, ps.tp_rank), "ep": (ps.layout.ep, ps.ep_rank)}
    own = model.state_dict(keep_vars=True)
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
    with handle as f, torch.no_grad():
        names = set(f.keys())
        for name, t in own.items():
            if name in skip or name.startswith("_deepspeed"):
                continue
            if name not in names:
                if name == "head.weight" and getattr(model.cfg, "tie_embeddings", False):
                    continue
                raise CheckpointError(f"{file}: missing tensor {name!r}")
            sl = f.get_slice(name)
            shape = sl.get_shape()
            index = [slice(None)] * len(shape)
            if name in specs:
                kind, dim = specs[name]
                n, r = sizes[kind]
                if shape[dim] % n:
                    raise CheckpointError(f"{file}: {name!r} dim {dim} ({shape[dim]}) does not split {n} ways")
                step = shape[dim] // n
                index[dim] = slice(r * step, (r + 1) * step)
            src = sl[tuple(index)]
            if tuple(src.shape) != tuple(t.shape):
                raise CheckpointError(f"{file}: {name!r} has shape {tuple(shape)}, this model's shard is "
                                      f"{tuple(t.shape)} (another model config?)")
            t.copy_(src)
