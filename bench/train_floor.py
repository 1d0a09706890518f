"""The training step against a floor: every product replayed alone, warm, at its best.

Issue 12 asks megads's fp32 training step (the small preset, B=4 S=512, forward + backward) for
75% of the measured fp32 matmul peak, and for 3x the tokens/s of transformers' step. This bench
asks what the step would take if each product in it (aten mm/bmm/addmm, torch._grouped_mm for
the routed experts, megads's attention kernel forward and backward) ran at the rate it reaches
*alone* (the best of repeated calls on the recorded operands) and everything else (norms, rope,
SwiGLU, permutes, residual adds, cross entropy's passes, gradient accumulation, Python) cost
nothing. One step is recorded op by op (bench/decode_floor.py's TorchDispatchMode, forward and
backward); each product is then replayed alone. In the same run: the step as it runs, transformers'
DeepseekV3 step on the same weights (bench/model.py's settings: no MTP, no sequence-wise
auxiliary loss), the fp32 peak (a 2048 x 2048 product, timed beside the steps in every round),
and the budgets: the model FLOPs at 75% of that peak, and transformers' step / 3.

Products are counted in model FLOPs (megads.model.info.flops_per_token's convention): 2 per
multiply-add of each product, the attention kernel as causal attention's half of the S x S
scores (its forward 2 x B x H x (d_qk + d_v) x S^2 / 2, its backward twice that; the kernel
itself also computes the diagonal blocks' masked half and recomputes the scores in the
backward, which the floor's time includes and the FLOPs do not). The counted total is printed
beside flops_per_token x tokens: they are equal, so every product of the step is in the table.

    PYTHONPATH=. .venv/bin/python bench/train_floor.py      # ~1 min on 2 cores

The floor is a bound at this machine's BLAS and megads's kernels' rates, not for every
implementation: kernels faster than their own warm best would lower it.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from decode_floor import PRODUCTS as DECODE_PRODUCTS
from decode_floor import best_alone, model_pair, print_products, record_best
from megads.runtime.hardware import add_malloc_argument, bench_malloc

PRODUCTS = {"mm", "bmm", "addmm", "_grouped_mm", "causal_attention", "causal_attention_backward"}
assert {"mm", "bmm", "addmm"} <= DECODE_PRODUCTS


def _dims(t) -> tuple:
    return tuple(t.shape)


def product_flops(name: str, args) -> int:
    """Model FLOPs (2 per multiply-add) of one training product call, from its arguments."""
    if name == "mm":
        (m, k), n = _dims(args[0]), args[1].shape[1]
        return 2 * m * k * n
    if name == "addmm":
        (m, k), n = _dims(args[1]), args[2].shape[1]
        return 2 * m * k * n
    if name == "bmm":
        (b, m, k), n = _dims(args[0]), args[1].shape[2]
        return 2 * b * m * k * n
    if name == "_grouped_mm":
        a, b = args[0], args[1]
        if a.dim() == 2 and b.dim() == 3:  # rows [M, K] by expert, weights [E, K, N]
            return 2 * a.shape[0] * a.shape[1] * b.shape[2]
        if a.dim() == 2 and b.dim() == 2:  # a weight gradient: [M, Ktot] x [Ktot, N], K split by expert
            return 2 * a.shape[0] * a.shape[1] * b.shape[1]
        if a.dim() == 3 and b.dim() == 3:
            return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        raise ValueError(f"_grouped_mm of {_dims(a)} x {_dims(b)}")
    if name in ("causal_attention", "causal_attention_backward"):
        # forward (q, k, v, ...), backward (grad_o, q, k, v, ...): q [B, S, H, Dq], v [B, S, H, Dv]
        q, v = (args[0], args[2]) if name == "causal_attention" else (args[1], args[3])
        B, S, H, Dq = q.shape
        fwd = 2 * B * H * (Dq + v.shape[3]) * S * S // 2
        return fwd if name == "causal_attention" else 2 * fwd
    raise ValueError(name)


def label(name: str, args, vocab: int) -> str:
    if name == "mm":
        a, b = args[0].shape, args[1].shape
        head = vocab in (a[0], a[1], b[0], b[1])
        return ("mm (output head) " if head else "mm ") + f"[{a[0]}x{a[1]}] x [{b[0]}x{b[1]}]"
    if name == "_grouped_mm":
        return f"_grouped_mm (routed experts) {list(args[0].shape)} x {list(args[1].shape)}"
    if name == "bmm":
        return f"bmm {list(args[0].shape)} x {list(args[1].shape)}"
    return f"{name} (megads::)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mfu", type=float, default=0.75, help="the MFU target (default 0.75)")
    p.add_argument("--ratio", type=float, default=3.0, help="the ratio to transformers' step (default 3)")
    p.add_argument("--reps", type=int, default=5, help="repeats of each timing (best kept)")
    p.add_argument("--top", type=int, default=12, help="rows of the other ops' table (default 12)")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    malloc = bench_malloc(args.malloc)

    from megads.model.info import flops_per_token
    from megads.runtime.precision import matmul_rate

    B, S = args.batch, args.seq
    cfg, ours, theirs = model_pair(args.preset, S)
    toks = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(2))
    inp, lab = toks[:, :-1], toks[:, 1:]

    def ours_step():
        ours.zero_grad(set_to_none=True)
        loss = ours(inp, labels=lab).loss
        loss.backward()
        return loss

    def theirs_step():
        theirs.zero_grad(set_to_none=True)
        loss = theirs(input_ids=inp, labels=inp).loss  # transformers shifts the labels itself
        loss.backward()
        return loss

    with torch.no_grad():
        a, b = ours.eval()(inp[:, :64]), theirs.eval()(inp[:, :64]).logits
    agree = ((a - b).abs().max() / b.abs().max()).item()
    assert agree < 1e-4, f"megads and transformers disagree on the logits (rel err {agree:.2e})"
    ours.train()
    theirs.train()
    ours_step()  # warm-up
    theirs_step()
    peak = matmul_rate(torch.float32, "cpu", n_max=2048)
    n_pk = 2048
    x_pk, y_pk = torch.randn(n_pk, n_pk), torch.randn(n_pk, n_pk)
    best = {"ours": float("inf"), "theirs": float("inf"), "peak": float("inf")}
    for _ in range(args.reps):  # interleaved: load from other processes hits all three
        for key, fn in (("ours", ours_step), ("theirs", theirs_step), ("peak", lambda: torch.mm(x_pk, y_pk))):
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    peak = max(peak, 2 * n_pk ** 3 / best["peak"])
    step_ours, step_theirs = best["ours"], best["theirs"]

    ops, best_in_step = record_best(ours_step)
    rows = collections.OrderedDict()
    others = collections.OrderedDict()
    for i, (name, func, a_, k_, _) in enumerate(ops):
        if name not in PRODUCTS:
            o = others.setdefault(str(func), [0, 0.0])
            o[0] += 1
            o[1] += best_in_step[i]
            continue
        r = rows.setdefault(label(name, a_, cfg.vocab_size), [0, 0, 0.0, 0.0])
        r[0] += 1
        r[1] += product_flops(name, a_)
        r[2] += best_in_step[i]
        r[3] += best_alone(func, a_, k_, args.reps)
    del ops
    ours.zero_grad(set_to_none=True)

    tokens = B * S
    model_flops = flops_per_token(cfg, seq_len=S) * tokens
    mfu_budget = model_flops / (args.mfu * peak)
    ratio_budget = step_theirs / args.ratio
    print(f"preset {args.preset} (mtp_depth 0, seq_aux_alpha 0), fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {malloc}")
    print(f"training step (forward + backward) at B={B} S={S}; fp32 matmul peak (torch.mm up to 2048, and "
          f"timed beside the steps): {peak / 1e9:.1f} GFLOP/s; megads's and transformers' logits "
          f"agree to {agree:.1e} rel")
    print()
    tot = print_products(rows, digits=(2, 1))
    other = sum(t for _, t in others.values())
    print(f"| the {sum(n for n, _ in others.values())} other ops | | | {other * 1e3:.1f} | | | |")
    print()
    print(f"products' FLOPs in the step: {tot[0]:,}; megads.model.info.flops_per_token x tokens: {model_flops:,}")
    print()
    print(f"The other ops, by time in the step (the {args.top} largest):")
    print()
    print("| op | calls | ms in the step |")
    print("|---|---|---|")
    for key, (n, t) in sorted(others.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"| {key} | {n} | {t * 1e3:.1f} |")
    print()
    print("| step | ms | tokens/s | MFU | x transformers |")
    print("|---|---|---|---|---|")
    for name, t in (("transformers' step", step_theirs), ("megads's step as it runs", step_ours),
                    ("its products in the step, nothing else", tot[1]),
                    ("its products alone, warm (the floor)", tot[2]),
                    (f"the budget of {100 * args.mfu:.0f}% MFU", mfu_budget),
                    (f"the budget of {args.ratio:g}x transformers", ratio_budget)):
        print(f"| {name} | {t * 1e3:,.1f} | {tokens / t:,.0f} | {100 * model_flops / t / peak:.1f}% | "
              f"{step_theirs / t:.2f}x |")
    print()
    print(f"The {100 * args.mfu:.0f}% MFU budget is {mfu_budget * 1e3:,.1f} ms a step: the products alone, each at its "
          f"warm best, take {tot[2] * 1e3:,.1f} ms ({100 * tot[2] / mfu_budget:.0f}% of it), the step as it runs "
          f"{step_ours * 1e3:,.1f} ms ({100 * step_ours / mfu_budget:.0f}%). {args.ratio:g}x transformers would "
          f"need {ratio_budget * 1e3:,.1f} ms ({100 * tot[2] / ratio_budget:.0f}% of it for the products alone).")
    print("(Times inside the recorded step are each op's best of three recorded steps; every op there also pays "
          "the mode's Python call, a few microseconds.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
