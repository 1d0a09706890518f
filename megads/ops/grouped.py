"""Grouped matmul over expert-contiguous rows: one kernel for all experts where torch has it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects expanded (stride-0) gradients
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e]^T for every expert e.

    x: [N, in] rows sorted by expert; weight: [E, out, in]; offsets: [E+1] row starts/ends.
    Uses torch._grouped_mm (fp32/bf16) when present; otherwise one matmul per non-empty segment
    with a single host read of the offsets. Under torch.compile it is one opaque custom op
    (`megads::grouped_linear`, below) running this same eager code: torch's fake kernel for
    _grouped_mm accepts bf16 only, and the segment loop reads the offsets on the host.
    """
    if torch.compiler.is_compiling():
        return torch.ops.megads.grouped_linear(x, weight, offsets)
    return _eager(x, weight, offsets)


def _eager(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    E = weight.shape[0]
    if not x.is_cuda and 0 < x.shape[0] <= 64:
        # decode-sized batches on CPU: per-expert (W @ x^T)^T beats both grouped_mm and x @ W^T
        bounds = offsets.tolist()
        parts = [torch.mm(weight[e], x[bounds[e]:bounds[e + 1]].t()).t()
                 for e in range(E) if bounds[e + 1] > bounds[e]]
        return torch.cat(parts, 0)
    if _HAS_GROUPED_MM and x.dtype in (torch.float32, torch.bfloat16) and x.shape[0] > 0 and (
        x.dtype == torch.float32 or (x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0)
    ):
        ends = offsets[1:].to(torch.int32)
        y = torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=ends)
        return _contiguous_grad(y)
    bounds = offsets.tolist()
    parts = [x[bounds[e]:bounds[e + 1]] @ weight[e].t() for e in range(E) if bounds[e + 1] > bounds[e]]
    if not parts:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(parts, 0)


# Decode batches on CPU (no autograd), by the number of expert rows N = B*k (bench/RESULTS.md,
# "Fourth session", "Eleventh session"): up to SWIGLU_ROWS, the native kernel
# megads::expert_swiglu_rows (float32, weight rows streamed against the few input rows; 2-4x the
# per-expert products; since its register tiles, ahead of the padded matmuls at 512 rows too);
# where it does not apply (bf16, no native ops), between PADDED_ROWS every expert's rows padded
# to the busiest expert's count for three batched matmuls (1.2x the per-expert products at 256
# rows); otherwise the grouped products.
SWIGLU_ROWS = 512
PADDED_ROWS = (64, 512)


def row_kernels(*tensors: torch.Tensor) -> bool:
    """The native few-row kernels apply: float32 CPU tensors, no autograd, native ops loaded."""
    if torch.is_grad_enabled() or not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return False
    from megads import ops
    from megads.ops import native

    return ops.backend() == "native" and native.has_row_kernels()


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """Every expert's SwiGLU on its rows: silu(x W1[e]^T) * (x W3[e]^T) then W2[e]^T.

    x: [N, in] rows sorted by expert (offsets [E+1]); w1/w3: [E, inter, in]; w2: [E, in, inter].
    Without autograd on CPU, for mid-sized decode batches (PADDED_ROWS), the rows are laid out
    padded [E, busiest expert's rows, in] for batched matmuls (an opaque op under torch.compile);
    otherwise three grouped_linear calls. With the native ops loaded, float32 batches of up to
    SWIGLU_ROWS rows take the native kernel instead."""
    if 0 < x.shape[0] <= SWIGLU_ROWS and row_kernels(x, w1, w3, w2):
        return torch.ops.megads.expert_swiglu_rows(x, offsets, w1, w3, w2)
    if not x.is_cuda and not torch.is_grad_enabled() and PADDED_ROWS[0] < x.shape[0] <= PADDED_ROWS[1]:
        if torch.compiler.is_compiling():
            return torch.ops.megads.padded_swiglu(x, w1, w3, w2, offsets)
        return _mid_batch_swiglu(x, w1, w3, w2, offsets)
    return _grouped_swiglu(x, w1, w3, w2, offsets)


def _grouped_swiglu(x, w1, w3, w2, offsets):
    h = F.silu(grouped_linear(x, w1, offsets)) * grouped_linear(x, w3, offsets)
    return grouped_linear(h, w2, offsets)


def _mid_batch_swiglu(x, w1, w3, w2, offsets):
    """Padded batched matmuls, unless the routing is so uneven that padding every expert to the
    busiest one's rows more than doubles the rows (bench/RESULTS.md: a skewed decode batch of 512
    rows took 2.4x the grouped products' time padded): then the grouped products."""
    most = int((offsets[1:] - offsets[:-1]).max())  # the one host read
    if w1.shape[0] * most > 2 * x.shape[0]:
        return _grouped_swiglu(x, w1, w3, w2, offsets)
    return _padded_swiglu(x, w1, w3, w2, offsets, most)


def _padded_swiglu(x, w1, w3, w2, offsets, most: int | None = None):
    E, N = w1.shape[0], x.shape[0]
    counts = offsets[1:] - offsets[:-1]
    most = int(counts.max()) if most is None else most
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=N)
    slot = torch.arange(N, device=x.device) - offsets[:-1].repeat_interleave(counts, output_size=N)
    xp = x.new_zeros(E, most, x.shape[1])
    xp[expert, slot] = x
    h = F.silu(torch.bmm(xp, w1.transpose(1, 2))) * torch.bmm(xp, w3.transpose(1, 2))
    return torch.bmm(h, w2.transpose(1, 2))[expert, slot]


@torch.library.custom_op("megads::padded_swiglu", mutates_args=())
def _padded_swiglu_op(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                      offsets: torch.Tensor) -> torch.Tensor:
    return _mid_batch_swiglu(x, w1, w3, w2, offsets)


@_padded_swiglu_op.register_fake
def _(x, w1, w3, w2, offsets):
    return x.new_empty(x.shape[0], w2.shape[1])


# ------------------------------------------------------------ the op torch.compile sees
@torch.library.custom_op("megads::grouped_linear", mutates_args=())
def _grouped_linear_op(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _eager(x, weight, offsets)  # always a new tensor (never a view of an input)


@_grouped_linear_op.register_fake
def _(x, weight, offsets):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("megads::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of y = grouped_linear(x, weight, offsets): dx = the same grouped product with
    each weight transposed; dweight[e] = dy[rows of e]^T x[rows of e] (zero for an expert with no
    rows)."""
    dx = _eager(dy, weight.transpose(1, 2).contiguous(), offsets)
    dw = torch.zeros_like(weight)
    bounds = offsets.tolist()
    for e in range(weight.shape[0]):
        if bounds[e + 1] > bounds[e]:
            torch.mm(dy[bounds[e]:bounds[e + 1]].t(), x[bounds[e]:bounds[e + 1]], out=dw[e])
    return dx, dw


@_grouped_linear_backward.register_fake
def _(dy, x, weight, offsets):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, weight, offsets = ctx.saved_tensors
    dx, dw = torch.ops.megads.grouped_linear_backward(dy.contiguous(), x, weight, offsets)
    return dx, dw, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup)
