"""Native MoE routing and token-dispatch ops: the csrc/ kernels as torch custom ops.

`load()` imports the compiled library `megads._C`, whose C++ side defines the ops
`torch.ops.megads.{route, permute, unpermute}` and their backward ops, with CPU kernels and, where
built, CUDA kernels. This module adds what torch needs around them: autograd formulas
(`register_autograd`) and fake kernels (`register_fake`) so that torch.compile can trace them.

`route`, `permute` and `unpermute` below have exactly the signatures and results of
megads.ops.reference. One documented difference: float64 logits are routed in float64 (and give
float64 weights), so that torch.autograd.gradcheck applies to the op; the reference computes in
float32 for every input dtype. Inputs on a device the library has no kernels for (CUDA tensors
with a CPU-only build) go to the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megads.ops import reference

_loaded = False
_kernels: dict[str, bool] = {}  # device type -> the library has kernels for it (set by load())


@dataclass
class NativePermuteState:
    """What unpermute needs: the row of every (token, slot) and the inverse map."""

    order: torch.Tensor  # [T*k] int64: flat (token, slot) position of each sorted row
    inv: torch.Tensor  # [T*k] int64: sorted row of each flat (token, slot) position
    num_tokens: int
    top_k: int

    @property
    def token_of(self) -> torch.Tensor:
        """[T*k] int64: source token of each sorted row (as reference.PermuteState)."""
        return torch.div(self.order, self.top_k, rounding_mode="floor")


def load() -> None:
    """Import megads._C and register autograd and fake kernels; raises if the library is missing."""
    global _loaded
    if _loaded:
        return
    import megads._C  # noqa: F401  - registers torch.ops.megads.* (C++ TORCH_LIBRARY)

    _register()
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _kernels[dev] = torch._C._dispatch_has_kernel_for_dispatch_key("megads::route", key)
    # the decode-time few-row kernels (CPU only); a library built before they were added lacks them
    _kernels["rows"] = all(hasattr(torch.ops.megads, op) for op in
                           ("linear_rows", "expert_swiglu_rows", "latent_attention_rows", "rms_norm_rows"))
    if _kernels["rows"]:
        torch.library.register_fake("megads::linear_rows")(_linear_rows_fake)
        torch.library.register_fake("megads::expert_swiglu_rows")(_swiglu_rows_fake)
        torch.library.register_fake("megads::latent_attention_rows")(_latent_attention_rows_fake)
        torch.library.register_fake("megads::rms_norm_rows")(_rms_norm_rows_fake)
    # training's RMSNorm on CPU: rms_norm_rows with its backward (a library built before lacks it)
    _kernels["rms_backward"] = _kernels["rows"] and hasattr(torch.ops.megads, "rms_norm_backward")
    if _kernels["rms_backward"]:
        torch.library.register_fake("megads::rms_norm_backward")(_rms_norm_backward_fake)
        torch.library.register_autograd("megads::rms_norm_rows", _rms_norm_rows_backward,
                                        setup_context=_rms_norm_rows_setup)
    _kernels["attention"] = hasattr(torch.ops.megads, "causal_attention")
    if _kernels["attention"]:
        torch.library.register_fake("megads::causal_attention")(_causal_attention_fake)
        torch.library.register_fake("megads::causal_attention_backward")(_causal_attention_backward_fake)
        torch.library.register_autograd("megads::causal_attention", _causal_attention_backward,
                                        setup_context=_causal_attention_setup)
    _kernels["softmax_rows"] = hasattr(torch.ops.megads, "softmax_rows_")
    if _kernels["softmax_rows"]:
        torch.library.register_fake("megads::softmax_rows_")(_softmax_rows_fake)
    _loaded = True


def has_softmax_rows() -> bool:
    """Whether the loaded library has cross entropy's CPU row kernel `megads::softmax_rows_`."""
    return _kernels.get("softmax_rows", False)


def has_rms_norm_backward() -> bool:
    """Whether `megads::rms_norm_rows` has its backward (`megads::rms_norm_backward`): training's
    RMSNorm on CPU in float32."""
    return _kernels.get("rms_backward", False)


def has_row_kernels() -> bool:
    """Whether the loaded library has the CPU decode kernels `megads::linear_rows`,
    `megads::expert_swiglu_rows`, `megads::latent_attention_rows` and `megads::rms_norm_rows`
    (float32, no autograd)."""
    return _kernels.get("rows", False)


def has_attention_kernel() -> bool:
    """Whether the loaded library has the CPU training attention kernel `megads::causal_attention`
    (float32/float64, with autograd)."""
    return _kernels.get("attention", False)


def has_kernels(device: torch.device | str) -> bool:
    """Whether the loaded library has kernels for tensors on `device` ('cpu', 'cuda')."""
    return _kernels.get(torch.device(device).type, False)


# ----------------------------------------------------------------------------------- public API

def route(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int = 1, topk_group: int = 1,
          score_func: str = "sigmoid", route_scale: float = 1.0, norm_topk_prob: bool = True):
    """Fused router: see megads.ops.reference.route. -> (weights [T, k], indices [T, k], counts [E])."""
    if not _kernels.get(logits.device.type, False):
        return reference.route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                               score_func=score_func, route_scale=route_scale, norm_topk_prob=norm_topk_prob)
    return torch.ops.megads.route(logits, bias, top_k, n_group, topk_group, score_func, float(route_scale),
                                  bool(norm_topk_prob))


def permute(x: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """x [T, H], indices [T, k] -> (x_sorted [T*k, H], offsets [E+1], state); stable by expert."""
    if not _kernels.get(x.device.type, False):
        return reference.permute(x, indices, num_experts)
    T, k = indices.shape
    x_sorted, offsets, order, inv = torch.ops.megads.permute(x, indices, num_experts)
    return x_sorted, offsets, NativePermuteState(order, inv, T, k)


def unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, state) -> torch.Tensor:
    """Weighted combine back to token order: y [T, H] = sum_j weights[t, j] * y_sorted[row(t, j)]."""
    if isinstance(state, reference.PermuteState):  # permute fell back to the reference
        return reference.unpermute(y_sorted, weights, state)
    return torch.ops.megads.unpermute(y_sorted, weights, state.inv)


# ------------------------------------------------------------------------- autograd and fakes

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _route_fake(logits, bias, top_k, n_group, topk_group, score_func, route_scale, norm_topk_prob):
    T, E = logits.shape
    weights = logits.new_empty((T, top_k), dtype=_acc_dtype(logits.dtype))
    indices = logits.new_empty((T, top_k), dtype=torch.int64)
    counts = logits.new_empty((E,), dtype=torch.int64)
    return weights, indices, counts


def _route_backward_fake(grad_weights, logits, indices, score_func, route_scale, norm_topk_prob):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, _bias, _top_k, _n_group, _topk_group, score_func, route_scale, norm = inputs
    _weights, indices, _counts = output
    ctx.save_for_backward(logits, indices)
    ctx.args = (score_func, route_scale, norm)


def _route_backward(ctx, grad_weights, _grad_indices, _grad_counts):
    logits, indices = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_weights is not None:
        grad_logits = torch.ops.megads.route_backward(grad_weights, logits, indices, *ctx.args)
    return grad_logits, None, None, None, None, None, None, None


def _permute_fake(x, indices, num_experts):
    N = indices.shape[0] * indices.shape[1]
    x_sorted = x.new_empty((N, x.shape[1]))
    offsets = indices.new_empty((num_experts + 1,), dtype=torch.int64)
    order = indices.new_empty((N,), dtype=torch.int64)
    inv = indices.new_empty((N,), dtype=torch.int64)
    return x_sorted, offsets, order, inv


def _permute_backward_fake(grad_x_sorted, inv, top_k):
    return grad_x_sorted.new_empty((grad_x_sorted.shape[0] // top_k, grad_x_sorted.shape[1]))


def _permute_setup(ctx, inputs, output):
    _x, indices, _num_experts = inputs
    ctx.save_for_backward(output[3])
    ctx.top_k = indices.shape[1]


def _permute_backward(ctx, grad_x_sorted, _g_offsets, _g_order, _g_inv):
    (inv,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0] and grad_x_sorted is not None:
        grad_x = torch.ops.megads.permute_backward(grad_x_sorted, inv, ctx.top_k)
    return grad_x, None, None


def _unpermute_fake(y_sorted, weights, inv):
    return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))


def _unpermute_backward_fake(grad_y, y_sorted, weights, inv):
    return torch.empty_like(y_sorted), torch.empty_like(weights)


def _unpermute_setup(ctx, inputs, output):
    y_sorted, weights, inv = inputs
    ctx.save_for_backward(y_sorted, weights, inv)


def _unpermute_backward(ctx, grad_y):
    y_sorted, weights, inv = ctx.saved_tensors
    if grad_y is None or not any(ctx.needs_input_grad[:2]):
        return None, None, None
    grad_y_sorted, grad_weights = torch.ops.megads.unpermute_backward(grad_y, y_sorted, weights, inv)
    return (grad_y_sorted if ctx.needs_input_grad[0] else None,
            grad_weights if ctx.needs_input_grad[1] else None, None)


def _linear_rows_fake(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def _swiglu_rows_fake(x, offsets, w1, w3, w2):
    return x.new_empty(x.shape[0], w2.shape[1])


def _latent_attention_rows_fake(q, joint, key_mask, value_dim, scale):
    return q.new_empty(q.shape[0], q.shape[1], value_dim)


def _rms_norm_rows_fake(x, w, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _causal_attention_fake(q, k, v, key_mask, scale):
    B, S, H = q.shape[:3]
    return q.new_empty(B, S, H, v.shape[3]), q.new_empty(B, H, S)


def _causal_attention_backward_fake(grad_o, q, k, v, key_mask, o, lse, scale):
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape))


def _rms_norm_backward_fake(dy, x, w, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), w.new_empty(w.shape)


def _rms_norm_rows_setup(ctx, inputs, output):
    x, w, ctx.eps = inputs
    ctx.save_for_backward(x, w)


def _rms_norm_rows_backward(ctx, dy):
    x, w = ctx.saved_tensors
    dx, dw = torch.ops.megads.rms_norm_backward(dy, x, w, ctx.eps)
    return dx.view(x.shape), dw, None


def _softmax_rows_fake(x, target):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


def _causal_attention_setup(ctx, inputs, output):
    q, k, v, key_mask, ctx.scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, key_mask, o, lse)


def _causal_attention_backward(ctx, grad_o, _grad_lse):
    q, k, v, key_mask, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.megads.causal_attention_backward(grad_o, q, k, v, key_mask, o, lse, ctx.scale)
    return dq, dk, dv, None, None


def _register() -> None:
    lib = torch.library
    lib.register_fake("megads::route")(_route_fake)
    lib.register_fake("megads::route_backward")(_route_backward_fake)
    lib.register_fake("megads::permute")(_permute_fake)
    lib.register_fake("megads::permute_backward")(_permute_backward_fake)
    lib.register_fake("megads::unpermute")(_unpermute_fake)
    lib.register_fake("megads::unpermute_backward")(_unpermute_backward_fake)
    lib.register_autograd("megads::route", _route_backward, setup_context=_route_setup)
    lib.register_autograd("megads::permute", _permute_backward, setup_context=_permute_setup)
    lib.register_autograd("megads::unpermute", _unpermute_backward, setup_context=_unpermute_setup)
