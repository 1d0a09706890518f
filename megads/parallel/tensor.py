"""Tensor (+sequence) parallel layers, Megatron-style. Each is exactly the plain op at size 1.

The model code uses only these layer types; `parallel/state.py` decides the group. A layer built
with `tp_group=None` (or a group of size 1) holds the full weight and does no communication.

Conventions: activations are [B, S, H]; with sequence parallelism the norm/residual regions hold
[B, S/tp, H] and the column-parallel input gathers the sequence, the row-parallel output
reduce-scatters it back.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megads.ops.grouped import row_kernels


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------- autograd collectives

class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (f in Megatron)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (g in Megatron)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = group_size(group), group_rank(group)
    return x.chunk(n, dim=dim)[r].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    x = x.contiguous()
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    if hasattr(dist, "reduce_scatter") and dist.get_backend(group) != "gloo":
        dist.reduce_scatter(out, parts, group=group)
        return out
    # gloo has no reduce_scatter: all-reduce then keep our chunk
    dist.all_reduce(x, group=group)
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


class _GatherFromTP(torch.autograd.Function):
    """All-gather along `dim` forward; split backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _ScatterToTP(torch.autograd.Function):
    """Split along `dim` forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    """Sequence parallel: all-gather the sequence forward, reduce-scatter the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Sequence parallel: reduce-scatter the sequence forward, all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


def copy_to_tp(x, group):
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x, group, dim=-1):
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, dim, group)


def scatter_to_tp(x, group, dim=-1):
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, dim, group)


def gather_from_sp(x, group, dim=1):
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, dim, group)


def reduce_scatter_to_sp(x, group, dim=1):
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, dim, group)


# ---------------------------------------------------------------- layers

ROWS_KERNEL = 24  # inputs of up to this many rows take megads::linear_rows where it applies
ROWS_TRANSPOSED = (32, 128)  # else W @ x^T on CPU up to this many rows (with, without autograd)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T. On CPU with few rows (decode steps), F.linear's x @ W^T is slow: float32 inputs of
    up to ROWS_KERNEL rows without autograd take the native megads::linear_rows (1.3-3x MKL);
    otherwise W @ x^T (same math, same autograd; ~3x F.linear for the output head at 4 rows,
    1.2-1.6x at 64 rows, about even from 256 rows) up to ROWS_TRANSPOSED rows: 32 with autograd,
    128 without (decode batches such as a 64-row rollout; training keeps F.linear there)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= ROWS_KERNEL and x.dim() >= 2 and row_kernels(x, weight):
        # the native few-row kernel (float32, no autograd): 1.3-3x MKL's product up to 16 rows,
        # 1.1-1.5x W @ x^T at 20-24 (bench/RESULTS.md, "Eleventh session"; even at 32)
        flat = x.reshape(rows, x.shape[-1])
        return torch.ops.megads.linear_rows(flat, weight).view(*x.shape[:-1], weight.shape[0])
    limit = ROWS_TRANSPOSED[0] if torch.is_grad_enabled() else ROWS_TRANSPOSED[1]
    if not x.is_cuda and 0 < rows <= limit and x.dim() >= 2:
        flat = x.reshape(rows, x.shape[-1])
        return torch.mm(weight, flat.t()).t().reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T with the module's weight, or its int8 copy after megads.model.quant.quantize_int8."""
    if getattr(module, "weight_int8", None) is not None:
        from megads.model.quant import int8_linear

        return int8_linear(x, module.weight_int8, module.weight_scale)
    return linear(x, module.weight)


def normal_init_(w: torch.Tensor, std: float) -> None:
    """w ~ normal(0, std) in place; nothing on the meta device, where a model built for its
    shapes (megads.train.init.build_local) is filled after it gets storage (seeded_init_ or a
    checkpoint). torch's normal_ on a meta tensor goes through its Python reference, whose first
    call imports torch._dynamo (1.5-2 s of start-up, for values nobody reads; `megads train`
    imports it anyway with torch's optimizer, `megads generate` no longer does)."""
    if not w.is_meta:
        nn.init.normal_(w, mean=0.0, std=std)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows over the TP group: each rank holds [out/tp, in].

    gather_output=True returns the full [.., out]; otherwise each rank keeps its [.., out/tp].
    With sequence_parallel the input arrives split along the sequence and is all-gathered.
    """

    def __init__(self, in_features, out_features, *, tp_group=None, gather_output=False,
                 sequence_parallel=False, std=0.02):
        super().__init__()
        tp = group_size(tp_group)
        if out_features % tp:
            raise ValueError(f"ColumnParallelLinear: out_features {out_features} not divisible by tp {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.gather_output, self.sequence_parallel = tp_group, gather_output, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        normal_init_(self.weight, std)
        self.param_init = {"weight": std}  # megads.model.init: the layout-independent seeded init

    def forward(self, x):
        if self.sequence_parallel:
            x = gather_from_sp(x, self.tp_group, dim=1)
        else:
            x = copy_to_tp(x, self.tp_group)
        y = project(self, x)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns: each rank holds [out, in/tp] and its x slice.

    The partial products are all-reduced (or reduce-scattered along the sequence under SP).
    """

    def __init__(self, in_features, out_features, *, tp_group=None, input_is_parallel=True,
                 sequence_parallel=False, std=0.02):
        super().__init__()
        tp = group_size(tp_group)
        if in_features % tp:
            raise ValueError(f"RowParallelLinear: in_features {in_features} not divisible by tp {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.input_is_parallel, self.sequence_parallel = tp_group, input_is_parallel, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        normal_init_(self.weight, std)
        self.param_init = {"weight": std}  # megads.model.init: the layout-independent seeded init

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        y = project(self, x)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(y, self.tp_group, dim=1)
        return reduce_from_tp(y, self.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over the TP group; out-of-shard ids contribute zero."""

    def __init__(self, num_embeddings, dim, *, tp_group=None, sequence_parallel=False, std=0.02):
        super().__init__()
        tp, r = group_size(tp_group), group_rank(tp_group)
        if num_embeddings % tp:
            raise ValueError(f"VocabParallelEmbedding: vocab {num_embeddings} not divisible by tp {tp}")
        self.num_embeddings, self.dim = num_embeddings, dim
        self.per_rank = num_embeddings // tp
        self.start = r * self.per_rank
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        normal_init_(self.weight, std)
        self.param_init = {"weight": std}  # megads.model.init: the layout-independent seeded init

    def forward(self, ids):
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.tp_group, dim=1)
        return reduce_from_tp(out, self.tp_group)


class _VocabParallelCE(torch.autograd.Function):
    """Cross entropy over logits [N, V/tp] (this rank's vocab shard; the whole vocabulary on one
    rank) without gathering the vocabulary, in one float buffer: the forward turns it into
    exp(logits - row max) in place and keeps it, the backward into the gradient (softmax - one-hot,
    times the incoming gradient) in place. With `owned` the buffer is the logits themselves (a
    temporary of the caller's, nobody else reads it: nothing vocabulary-wide is allocated;
    F.cross_entropy writes a log-softmax, a zero-filled gradient and a log-softmax backward,
    bench/RESULTS.md), and only one backward can run. float32 at least (float64 stays float64).
    On CPU with the native ops the forward's row work is one pass (megads::softmax_rows_: max,
    exp, sum and the target's logit), each shard's exps taken against its own row max and rescaled
    by exp(own max - global max) in the sums and the backward."""

    @staticmethod
    def forward(ctx, logits, target, start, group, ignore_index, owned):
        if logits.dtype in (torch.float32, torch.float64):
            x = logits.detach() if owned else logits.detach().clone()
        else:
            x = logits.float()
        parallel = group_size(group) > 1
        local = target - start
        valid = target != ignore_index
        inside = (local >= 0) & (local < x.shape[-1]) & valid
        idx = torch.where(inside, local, torch.zeros_like(local)).unsqueeze(-1)
        factor = None  # exp(this shard's row max - the global one), where the shard's exps used its own
        if _native_softmax_rows(x):
            lmax, sumexp, raw = torch.ops.megads.softmax_rows_(x, torch.where(inside, local, -1))
            gmax = lmax
            if parallel:
                gmax = lmax.clone()
                dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
                factor = torch.exp(lmax - gmax)
                sumexp = sumexp * factor
            picked = torch.where(inside, raw - gmax, 0.0)
        else:
            lmax = x.amax(dim=-1)
            if parallel:
                dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
            x.sub_(lmax.unsqueeze(-1))
            picked = x.gather(-1, idx).squeeze(-1) * inside
            sumexp = x.exp_().sum(-1)
        if parallel:
            both = torch.stack([picked, sumexp])
            dist.all_reduce(both, group=group)
            picked, sumexp = both[0], both[1]
        loss = (sumexp.log() - picked) * valid
        ctx.save_for_backward(x, sumexp, idx, inside, valid, factor)
        ctx.in_dtype, ctx.consumed = logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.consumed:
            raise RuntimeError("cross entropy: a second backward through the same logits (their buffer "
                               "became the first backward's gradient)")
        ctx.consumed = True
        x, sumexp, idx, inside, valid, factor = ctx.saved_tensors
        scale = (g * valid).to(x.dtype)
        col = scale / sumexp if factor is None else scale * factor / sumexp
        grad = x.mul_(col.unsqueeze(-1))  # softmax times the incoming gradient
        grad.scatter_add_(-1, idx, -(scale * inside).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


def _native_softmax_rows(x) -> bool:
    """Cross entropy's forward takes megads::softmax_rows_: a contiguous float32 CPU buffer, native
    ops loaded, a CPU with AVX2 (the kernel's plain loops, float64's included, are slower than
    torch's vectorised passes) and MEGADS_CPU_PLAIN unset."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or \
            os.environ.get("MEGADS_CPU_PLAIN", "0") not in ("", "0"):
        return False
    from megads import ops
    from megads.ops import native

    return ops.backend() == "native" and native.has_softmax_rows()


def vocab_parallel_cross_entropy(logits, target, *, tp_group=None, vocab_start=0, ignore_index=-100,
                                 owned: bool = False):
    """Per-token loss [N] from logits [N, V/tp] (this rank's vocab shard starting at vocab_start).
    owned: the logits are a temporary of the caller's, which the loss may overwrite (their storage
    becomes their gradient)."""
    if group_size(tp_group) == 1 and not owned:
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return _VocabParallelCE.apply(logits, target, vocab_start, tp_group, ignore_index, owned)


def scaled_init_std(base: float, num_layers: int) -> float:
    """Megatron's output-layer init: std / sqrt(2 * num_layers)."""
    return base / math.sqrt(2.0 * num_layers)
