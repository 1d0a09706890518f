"""The rollout decode step against a floor: every product replayed alone, warm, at its best.

Issue 12's rollout target asks megads's decode step at B=64 for 8x the tokens/s of transformers'
step. This bench asks what megads's step would take if each product in it (aten mm/bmm/addmm and
the native expert, attention and row kernels) ran at the rate it reaches *alone*, its operands
in cache (the best of repeated calls), and everything else (norms, rope, routing, permutes,
copies, Python) cost nothing. One decode step of the preset is recorded op by op (a
TorchDispatchMode: each op, its arguments and its time inside the step, whose weights come from
memory as in real decoding); each product is then replayed alone. In the same run: the step as it
runs (no mode), transformers' DeepseekV3 step on the same weights (one new token per row with its
cache after the same prompt), and the budget that the target leaves (transformers' step / 8).

The floor is a bound for these products at this machine's BLAS and megads's kernels' rates, not
for every possible implementation: kernels faster than their own warm best would lower it. Times
inside the recorded step include the mode's Python call per op (microseconds: small next to a
product, but it inflates the sum of the ~500 small ops).

    PYTHONPATH=. .venv/bin/python bench/decode_floor.py      # ~20 s on 2 cores

At a few rows (--batch 4) the step is bound by reading the weights from memory, which a warm
replay does not pay: the floor then says little (bench/model.py's bytes-per-step figure does).
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megads.runtime.hardware import add_malloc_argument, bench_malloc

PRODUCTS = {"mm", "bmm", "addmm", "linear_rows", "expert_swiglu_rows", "latent_attention_rows"}


def op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def product_flops(name: str, args) -> int:
    """Multiply-add FLOPs (2 per MAC) of one product call, from its arguments."""
    if name == "mm":
        (m, k), n = args[0].shape, args[1].shape[1]
        return 2 * m * k * n
    if name == "addmm":
        (m, k), n = args[1].shape, args[2].shape[1]
        return 2 * m * k * n
    if name == "bmm":
        (b, m, k), n = args[0].shape, args[1].shape[2]
        return 2 * b * m * k * n
    if name == "linear_rows":  # x [R, K], w [N, K]
        return 2 * args[0].shape[0] * args[1].shape[0] * args[0].shape[1]
    if name == "expert_swiglu_rows":  # x [N, D], offsets, w1/w3 [E, I, D], w2 [E, D, I]
        n, d = args[0].shape
        return 6 * n * d * args[2].shape[1]
    if name == "latent_attention_rows":  # q [B, H, C], joint [B, T, C], key_mask [B, T] | None, value_dim
        q, joint, mask, value_dim = args[0], args[1], args[2], args[3]
        kept = int(mask.sum()) if mask is not None else q.shape[0] * joint.shape[1]
        return 2 * q.shape[1] * (q.shape[2] + value_dim) * kept
    raise ValueError(name)


class Recorder(TorchDispatchMode):
    """Every op of the step in order: (name, func, args, kwargs, seconds inside the step)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = time.perf_counter()
        out = func(*args, **kwargs)
        self.ops.append((op_name(func), func, args, kwargs, time.perf_counter() - t))
        return out


def record_best(step, times: int = 3) -> tuple[list, list]:
    """The ops of `step` (the last of `times` recorded runs: name, func, args, kwargs, seconds) and
    each op's least disturbed time over the runs (the ops of one step are the same every run)."""
    best = None
    for _ in range(times):
        rec = Recorder()
        with rec:
            step()
        dts = [op[4] for op in rec.ops]
        best = dts if best is None else [min(a, b) for a, b in zip(best, dts)]
    return rec.ops, best


def best_alone(func, args, kwargs, reps: int) -> float:
    for _ in range(2):  # operands into cache
        func(*args, **kwargs)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        func(*args, **kwargs)
        best = min(best, time.perf_counter() - t)
    return best


def label(name: str, args, vocab: int) -> str:
    if name == "mm":
        a, b = args[0].shape, args[1].shape
        return "mm (output head)" if vocab in (a[0], b[1]) else f"mm [{a[0]}x{a[1]}] x [{b[0]}x{b[1]}]"
    if name == "bmm":
        return f"bmm {list(args[0].shape)} x {list(args[1].shape)}"
    return name


def model_pair(preset: str, max_len: int):
    """(cfg, megads's model, transformers' DeepseekV3 on the same weights), float32, as bench/model.py
    builds them: no MTP, no sequence-wise auxiliary loss (the two compute the same loss)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    from megads import hf
    from megads.config import load_model_preset
    from megads.model import Transformer

    hf_logging.set_verbosity_error()
    cfg = load_model_preset(preset)
    cfg.mtp_depth, cfg.seq_aux_alpha = 0, 0.0
    cfg.max_seq_len = max(cfg.max_seq_len, max_len)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.megads_to_hf(ours, d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    return cfg, ours, theirs


def print_products(rows: dict, digits: tuple = (3, 2)) -> tuple[int, float, float]:
    """The products' table (rows: label -> [calls, FLOPs, s in the step, s alone]), largest time in
    the step first, and its total row; returns (FLOPs, s in the step, s alone) summed."""
    g, t = digits
    print("| product | calls | GFLOP | ms in the step | ms alone, warm | GFLOP/s in the step | alone, warm |")
    print("|---|---|---|---|---|---|---|")
    tot = [0, 0.0, 0.0]
    for key, (n, fl, t_in, t_alone) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        tot[0] += fl
        tot[1] += t_in
        tot[2] += t_alone
        print(f"| {key} | {n} | {fl / 1e9:.{g}f} | {t_in * 1e3:.{t}f} | {t_alone * 1e3:.{t}f} | "
              f"{fl / t_in / 1e9:.0f} | {fl / t_alone / 1e9:.0f} |")
    print(f"| **all products** | | {tot[0] / 1e9:.{g}f} | {tot[1] * 1e3:.{t}f} | {tot[2] * 1e3:.{t}f} | "
          f"{tot[0] / tot[1] / 1e9:.0f} | {tot[0] / tot[2] / 1e9:.0f} |")
    return tot[0], tot[1], tot[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=64, help="decode rows (default 64: a rollout batch)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before the step (default 128)")
    p.add_argument("--target", type=float, default=8.0, help="the ratio to transformers' step (default 8)")
    p.add_argument("--reps", type=int, default=15, help="repeats of each timing (best kept)")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    malloc = bench_malloc(args.malloc)

    from megads.model.cache import new_cache
    from megads.model.info import decode_flops_per_token
    from megads.runtime.precision import matmul_rate

    B, P = args.batch, args.prompt
    cfg, ours, theirs = model_pair(args.preset, P + 8)
    ours.eval()
    theirs.eval()
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
    nxt = prompt[:, -1:]
    peak = matmul_rate(torch.float32, "cpu", n_max=2048)

    with torch.no_grad():
        cache = new_cache(cfg, B, P + 4)
        ours(prompt, cache=cache)

        def ours_step():  # the same position every time: the cache's length is put back
            out = ours(nxt, cache=cache)
            cache.length -= 1
            return out

        pos = torch.full((B, 1), P, dtype=torch.long)
        hf_out = theirs(prompt, use_cache=True)
        hf_cache = getattr(hf_out, "cache", None) or hf_out.past_key_values

        def theirs_step():  # one token per row after the prompt (the cache cropped back to it)
            out = theirs(nxt, cache=hf_cache, position_ids=pos, use_cache=True)
            hf_cache.crop(-1)
            return out.logits

        a, b = ours_step()[:, -1], theirs_step()[:, -1]
        agree = ((a - b).abs().max() / b.abs().max()).item()
        assert agree < 1e-4, f"megads and transformers disagree on the step (rel err {agree:.2e})"

        best = {"ours": float("inf"), "theirs": float("inf")}
        for _ in range(max(3, args.reps // 3)):  # interleaved: load from other processes hits both
            for key, fn in (("ours", ours_step), ("theirs", theirs_step)):
                t = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t)
        step_ours, step_theirs = best["ours"], best["theirs"]
        for _ in range(3):
            ours_step()
        ops, best_in_step = record_best(ours_step)
        rows = collections.OrderedDict()
        other_in_step, n_other = 0.0, 0
        for i, (name, func, a_, k_, _) in enumerate(ops):
            if name not in PRODUCTS:
                other_in_step += best_in_step[i]
                n_other += 1
                continue
            key = label(name, a_, cfg.vocab_size)
            r = rows.setdefault(key, [0, 0, 0.0, 0.0])
            r[0] += 1
            r[1] += product_flops(name, a_)
            r[2] += best_in_step[i]
            r[3] += best_alone(func, a_, k_, args.reps)

    budget = step_theirs / args.target
    print(f"preset {args.preset}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}; {malloc}")
    print(f"decode step at B={B} after a {P}-token prompt; fp32 matmul peak (torch.mm up to 2048): "
          f"{peak / 1e9:.1f} GFLOP/s; megads and transformers agree on the step to {agree:.1e} rel")
    print()
    tot = print_products(rows)
    print(f"| the {n_other} other ops (norms, rope, routing, copies, ...) | | | {other_in_step * 1e3:.2f} | | | |")
    print()
    print(f"products' FLOPs in the step: {tot[0]:,}; megads.model.info.decode_flops_per_token x rows: "
          f"{B * decode_flops_per_token(cfg, P + 1):,}")
    print()
    print("| step | ms | tokens/s | x transformers |")
    print("|---|---|---|---|")
    print(f"| transformers' step | {step_theirs * 1e3:.1f} | {B / step_theirs:,.0f} | 1.00x |")
    print(f"| megads's step as it runs | {step_ours * 1e3:.1f} | {B / step_ours:,.0f} | "
          f"{step_theirs / step_ours:.2f}x |")
    print(f"| its products alone, warm (the floor) | {tot[2] * 1e3:.1f} | {B / tot[2]:,.0f} | "
          f"{step_theirs / tot[2]:.2f}x |")
    print(f"| the target's budget ({args.target:g}x) | {budget * 1e3:.1f} | {B / budget:,.0f} | {args.target:.2f}x |")
    print()
    print(f"The {args.target:g}x budget is {budget * 1e3:.1f} ms a step. The products alone, each at its warm best, "
          f"take {tot[2] * 1e3:.1f} ms ({100 * tot[2] / budget:.0f}% of it); the step as it runs "
          f"{step_ours * 1e3:.1f} ms ({100 * step_ours / budget:.0f}%).")
    print("(Times inside the recorded step are each op's best of three recorded steps; every op there also pays "
          "the mode's Python call, a few microseconds, which inflates the many small ops' sum.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
