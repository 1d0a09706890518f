"""Initialisation that does not depend on the parallel layout: every rank builds only its shards.

A model is built on the meta device (no memory, no random numbers), `materialize`d on its device,
then `seeded_init_` fills each parameter from its own random stream: the full tensor of parameter
`name` is cut into blocks of rows (along dim 0, about a million values a block), and block b is
drawn from a generator seeded by (seed, name, b). A rank that holds a slice of the full tensor
(a TP shard, its routed experts, its pipeline stage's blocks) draws only the blocks its slice
overlaps, so the slice equals the same slice of the single-process initialisation, whatever the
layout; memory beyond the shard is one block.

Each module says how its parameters start in `module.param_init` ({local name: std of a normal
draw, or "ones"}); a parameter without one is an error, so a new layer cannot silently skip it.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

BLOCK_VALUES = 1 << 20  # values per generated block (layout-independent: a function of the full shape)


def init_spec(module: nn.Module, **specs) -> None:
    """Record how `module`'s parameters start: name=std (normal(0, std)) or name="ones"."""
    module.param_init = {**getattr(module, "param_init", {}), **specs}


def materialize(model: nn.Module, device) -> nn.Module:
    """Storage on `device` for a model built on the meta device (values undefined until
    initialised or loaded), with its tied head re-tied and its buffers computed: `init_buffers()`
    of each module that has one (rope tables, router biases)."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    model.to_empty(device=device)
    if tied and getattr(model, "head", None) is not None and getattr(model, "embed", None) is not None:
        model.head.weight = model.embed.weight
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    return model


def block_seed(seed: int, name: str, block: int) -> int:
    h = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def rows_per_block(full_shape) -> int:
    inner = math.prod(full_shape[1:]) if len(full_shape) > 1 else 1
    return max(1, BLOCK_VALUES // max(1, inner))


def normal_slice(seed: int, name: str, full_shape, std: float, dim: int = 0, start: int = 0,
                 length: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """Rows [start, start+length) along `dim` of the full normal(0, std) tensor of `name`
    (the whole tensor when length is None), generated block by block."""
    full_shape = tuple(full_shape)
    if not full_shape:
        g = torch.Generator().manual_seed(block_seed(seed, name, 0))
        return (torch.randn((), generator=g, dtype=torch.float32) * std).to(dtype)
    length = full_shape[dim] - start if length is None else length
    R = rows_per_block(full_shape)
    n0 = full_shape[0]
    if dim == 0:
        lo, hi = start, start + length
    else:
        lo, hi = 0, n0
    parts = []
    for b in range(lo // R, -(-hi // R)):
        r0, r1 = b * R, min(n0, (b + 1) * R)
        g = torch.Generator().manual_seed(block_seed(seed, name, b))
        x = torch.randn((r1 - r0,) + full_shape[1:], generator=g, dtype=torch.float32)
        if dim == 0:
            x = x[max(lo, r0) - r0: min(hi, r1) - r0]
        else:
            x = x.narrow(dim, start, length)
        parts.append((x * std).to(dtype))
    return torch.cat(parts, dim=0)


def _specs(model: nn.Module) -> dict[str, object]:
    out = {}
    for mname, m in model.named_modules():
        for pname, spec in getattr(m, "param_init", {}).items():
            out[f"{mname}.{pname}" if mname else pname] = spec
    return out


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, slices: dict | None = None) -> None:
    """Fill every parameter of `model` from its own stream (see the module docstring).

    slices: {param name: (dim, start, full length)} for the parameters this rank holds a slice
    of (megads.parallel.shard.shard_slices); the rest are whole."""
    slices = slices or {}
    specs = _specs(model)
    for name, p in model.named_parameters():
        if name not in specs:
            raise ValueError(f"parameter {name!r} has no initialisation rule (set its module's param_init "
                             f"with megads.model.init.init_spec)")
        spec = specs[name]
        if spec == "ones":
            p.fill_(1.0)
            continue
        if spec == "zeros":
            p.zero_()
            continue
        dim, start, full = slices.get(name, (0, 0, p.shape[0] if p.dim() else 0))
        shape = list(p.shape)
        if shape:
            shape[dim] = full
        p.copy_(normal_slice(seed, name, shape, float(spec), dim, start, p.shape[dim] if p.dim() else None,
                             p.dtype))
