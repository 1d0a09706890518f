"""Weight-only int8 against float32 for the products of a decode step (megads.model.quant).

For each projection shape of a preset (and a 1024/4096-wide pair for scale), at 1, 4, 16 and 64
rows: the fp32 product the model runs when decoding (megads.parallel.tensor.linear without
autograd: the native megads::linear_rows up to 16 rows, W @ x^T beyond) and the int8 one
(int8_linear: torch's int8-weight kernel, bf16 activations in), best of repeats, with the weight
bytes each reads per call and the int8 product's error against a float64 reference.

    python bench/int8.py [--preset small] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best(fn, reps: int = 50) -> float:
    fn()
    t_best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megads.config import load_model_preset
    from megads.model.quant import _has_kernel, int8_linear, quantize_weight
    from megads.parallel.tensor import linear

    c = load_model_preset(args.preset)
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    shapes = {
        "wq_b": (c.num_heads * qk, c.q_lora_rank), "wkv_a": (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
        "wo": (c.hidden_size, c.num_heads * c.v_head_dim), "dense w1": (c.intermediate_size, c.hidden_size),
        "expert w1": (c.moe_intermediate_size, c.hidden_size), "head": (c.vocab_size, c.hidden_size),
        "4096x1024": (4096, 1024), "1024x4096": (1024, 4096),
    }
    print(f"preset {args.preset}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"int8 kernel here: {_has_kernel(torch.device('cpu'))}; load {os.getloadavg()[0]:.1f}")
    head = ("weight [out, in]", "rows", "fp32 ms", "fp32 GB/s", "int8 ms", "int8 GB/s", "int8/fp32 speed", "int8 rel err")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    g = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)  # as in decoding: linear takes the native few-row kernel where it applies
    for name, (o, i) in shapes.items():
        w = torch.randn(o, i, generator=g) * 0.02
        q, s = quantize_weight(w)
        for rows in (1, 4, 16, 64):
            x = torch.randn(rows, i, generator=g)
            a = best(lambda: linear(x, w))
            b = best(lambda: int8_linear(x, q, s))
            ref = x.double() @ w.double().t()
            err = ((int8_linear(x, q, s).double() - ref).abs().max() / ref.abs().max()).item()
            print(f"| {name} [{o}, {i}] | {rows} | {a * 1e3:.3f} | {o * i * 4 / a / 1e9:.1f} | {b * 1e3:.3f} | "
                  f"{o * i / b / 1e9:.1f} | {a / b:.2f}x | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
