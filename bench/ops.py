"""MoE routing + token dispatch: native kernels (csrc/) against the pure-torch path, same run.

Times forward + backward of route, permute and unpermute (each alone and chained, with identity
experts so that every byte of dispatch traffic is the ops' own), then a whole MoE layer
(megads.model.moe.MoE) with each backend. Prints a table; the figures go to bench/RESULTS.md.

    python bench/ops.py                      # CPU, T=4096 H=1024 E=64 k=8, 8 groups (4 kept)
    python bench/ops.py --device cuda        # the same on the GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

from megads import ops
from megads.ops import reference


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, iters: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def op_cases(a, device, dtype):
    """name -> fn(impl) running forward + backward of one piece of the dispatch path."""
    T, H, E, k = a.tokens, a.hidden, a.experts, a.top_k
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(device).requires_grad_(True)
    bias = (torch.randn(E, generator=g) * 0.1).to(device)
    x = torch.randn(T, H, generator=g).to(device, dtype).requires_grad_(True)
    grad_y = torch.randn(T, H, generator=g).to(device, dtype)
    grad_w = torch.randn(T, k, generator=g).to(device)
    kw = dict(top_k=k, n_group=a.groups, topk_group=a.topk_groups, score_func="sigmoid", route_scale=2.5)
    _, idx, _ = reference.route(logits.detach(), bias, **kw)
    weights = torch.rand(T, k, generator=g).to(device).requires_grad_(True)
    y_sorted = torch.randn(T * k, H, generator=g).to(device, dtype).requires_grad_(True)

    def grads(out, inputs, grad_out):  # torch.autograd.grad: no accumulation into leaf .grad
        torch.autograd.grad(out, inputs, grad_out)

    def route(impl):
        w, _, _ = impl.route(logits, bias, **kw)
        grads(w, [logits], grad_w)

    def permute(impl):
        xs, _, _ = impl.permute(x, idx, E)
        grads(xs, [x], y_sorted.detach())

    states = {}

    def unpermute(impl):
        if impl not in states:
            states[impl] = impl.permute(x.detach(), idx, E)[2]
        grads(impl.unpermute(y_sorted, weights, states[impl]), [y_sorted, weights], grad_y)

    def chain(impl):
        w, i, _ = impl.route(logits, bias, **kw)
        xs, _, st = impl.permute(x, i, E)
        grads(impl.unpermute(xs, w.to(dtype), st), [logits, x], grad_y)  # identity experts

    return {"route": route, "permute": permute, "unpermute": unpermute, "route+permute+unpermute": chain}


def moe_layer_case(a, device, dtype):
    """fn() running forward + backward of a MoE layer with the benchmark's routing shape, or None."""
    try:
        from megads.config import load_model_preset
        from megads.model.moe import MoE
    except Exception:  # the model package is not there (yet)
        return None
    cfg = dataclasses.replace(load_model_preset("small"), hidden_size=a.hidden, n_routed_experts=a.experts,
                              num_experts_per_tok=a.top_k, n_group=a.groups, topk_group=a.topk_groups,
                              moe_intermediate_size=a.moe_inter)
    torch.manual_seed(0)
    layer = MoE(cfg).to(device, dtype).train()
    layer.gate.bias.normal_(0, 0.1)
    x = torch.randn(1, a.tokens, a.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        y, aux = layer(x)
        torch.autograd.grad([y, aux], [x, *params], [grad, torch.ones_like(aux)], allow_unused=True)
    return run, cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--moe-inter", type=int, default=128, help="expert width of the whole-layer benchmark")
    p.add_argument("--iters", type=int, default=0, help="timed repeats (default: 10 on CPU, 50 on GPU)")
    p.add_argument("--no-layer", action="store_true", help="skip the whole-MoE-layer benchmark")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    iters = a.iters or (50 if device.type == "cuda" else 10)
    warmup = 3 if device.type == "cuda" else 2

    from megads.ops import native

    native.load()
    if not native.has_kernels(device):
        raise SystemExit(f"the native library has no kernels for {device.type}; rebuild it (see setup_ext.py)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# megads MoE ops: torch {torch.__version__}, {device.type} ({where}), {a.dtype}")
    print(f"# T={a.tokens} H={a.hidden} E={a.experts} k={a.top_k} groups={a.groups} "
          f"(keep {a.topk_groups}), sigmoid + bias; forward+backward, median of {iters}")
    print(f"| {'what (fwd+bwd)':<32} | {'torch ms':>9} | {'native ms':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")

    def row(name, t_torch, t_native):
        print(f"| {name:<32} | {t_torch:9.2f} | {t_native:9.2f} | {t_torch / t_native:7.2f}x |", flush=True)

    for name, fn in op_cases(a, device, dtype).items():
        row(name, timeit(lambda: fn(reference), device, iters, warmup),
            timeit(lambda: fn(native), device, iters, warmup))

    case = None if a.no_layer else moe_layer_case(a, device, dtype)
    if case is not None:
        run, cfg = case
        times = {}
        for backend in ("torch", "native"):
            ops.set_backend(backend)
            times[backend] = timeit(run, device, max(3, iters // 3), 1)
        row(f"MoE layer (expert width {cfg.moe_intermediate_size})", times["torch"], times["native"])


if __name__ == "__main__":
    main()
