"""megads vs transformers' DeepseekV3ForCausalLM on the same config and weights (CPU, --dtype).

Measures, in one run on this machine:
- training: forward+backward tokens/s and MFU (model FLOPs from megads.model.info against this
  machine's fp32 matmul rate, measured here with a large torch.mm: the best rate of the run, and,
  since this kind of machine drifts in speed within minutes, also the median over the rounds of
  each round's MFU against the same product timed beside the step in that round);
- decode: greedy tokens/s after a long prompt (prefill timed separately and subtracted);
- KV cache: bytes per token (megads: its MLACache; transformers: the DynamicCache tensors after
  prefill divided by the tokens);
- what issue 12's ratio targets ask of this machine: the training MFU that 3x transformers'
  tokens/s would take (3 x its MFU in this run), and the share of the measured peak a decode step
  reaches (rows x megads.model.info.decode_flops_per_token at the mean context, over the best
  step) on each side, and what megads's step would need for the decode target (5x at B <= 4, 8x
  above). Over 100% means no implementation of these FLOPs in this dtype can meet the target here.

The `small` preset with mtp_depth 0 and seq_aux_alpha 0, so both models compute the same thing.
megads weights are exported with megads.hf.megads_to_hf and loaded by transformers; the two
models' logits are checked to agree before anything is timed.

    PYTHONPATH=. .venv/bin/python bench/model.py            # ~5-8 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/model.py --quick    # ~1 min
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from megads.runtime.hardware import add_malloc_argument, bench_malloc


def matmul_peak(n: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n torch.mm in `dtype` (megads.runtime.precision's measurement, the one
    `train.precision: auto` uses; bounded in time where the dtype is slow)."""
    from megads.runtime.precision import matmul_rate

    return matmul_rate(dtype, "cpu", n_max=n)


def time_interleaved(fns: dict, reps: int, warmup: int = 1, record: dict | None = None) -> dict:
    """Best wall time of each fn over `reps` rounds, the fns alternating inside a round so that
    load from other processes on a shared machine hits them alike (the minimum is the least
    disturbed run). record: a dict of lists that gets every round's time of each fn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            best[k] = min(best[k], dt)
            if record is not None:
                record.setdefault(k, []).append(dt)
    return best


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, ~1 min)")
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=None, help="decode rows (default 4; 64: a rollout batch)")
    p.add_argument("--decode-prompt", type=int, default=None, help="prompt tokens before decoding (default 1024)")
    p.add_argument("--decode-new", type=int, default=None, help="tokens decoded (default 32)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="both models' weights (and caches); auto: what train.precision auto picks here")
    p.add_argument("--int8", action="store_true",
                   help="also decode with megads' weight-only int8 copy (megads generate --weights int8)")
    p.add_argument("--decode-modes", default="",
                   help="also decode with these fixed-shape step modes of megads.model.static, comma-separated "
                        "(static, compile)")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    modes = [m for m in args.decode_modes.split(",") if m]
    for m in modes:
        if m not in ("static", "compile"):
            p.error(f"--decode-modes: {m!r} is not one of static, compile (graph needs CUDA; this bench runs on CPU)")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(bench_malloc(args.malloc))

    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    from megads import hf, ops
    from megads.config import load_model_preset
    from megads.model import MLACache, Transformer
    from megads.model.info import decode_flops_per_token, flops_per_token
    from megads.model.static import StaticDecode

    hf_logging.set_verbosity_error()
    if args.quick:
        tb, ts, steps, db, dp, dn, mm, decode_reps = 2, 128, 2, 2, 256, 8, 1024, 2
    else:
        tb, ts, steps, db, dp, dn, mm, decode_reps = 4, 512, 5, 4, 1024, 32, 2048, 3
    db, dp, dn = args.decode_batch or db, args.decode_prompt or dp, args.decode_new or dn
    cfg = load_model_preset(args.preset)
    cfg.mtp_depth, cfg.seq_aux_alpha = 0, 0.0
    cfg.max_seq_len = max(cfg.max_seq_len, dp + dn, ts)

    torch.manual_seed(0)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.megads_to_hf(ours, d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    impl = f"attn={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"

    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x).logits
    agree = ((a - b).abs().max() / b.abs().max()).item()
    assert agree < 1e-4, f"megads and transformers disagree (rel err {agree:.2e})"
    from megads.runtime.precision import DTYPES, cast_params, resolve

    name, peaks = resolve(args.dtype)  # auto: train.precision auto's choice; both peaks measured
    dt = DTYPES[name]
    cast_params(ours, dt)  # both sides in the same dtype (bf16: weights, activations and caches; ours
    # keeps its float32 rope and router-bias buffers, as under DeepSpeed's bf16)
    theirs.to(dt)
    peak = matmul_peak(mm, dt)

    # ---------------------------------------------------------------- training
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, cfg.vocab_size, (tb, ts + 1), generator=g)
    inp, lab = toks[:, :-1], toks[:, 1:]

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(inp, labels=lab).loss.backward()

    def theirs_step():
        theirs.zero_grad(set_to_none=True)
        theirs(input_ids=inp, labels=inp).loss.backward()  # transformers shifts the labels itself

    # a square product timed between the two steps in every round: the MFU of each round against
    # the peak of the same moment (this machine's speed drifts by a third within minutes)
    n_pk = mm if peak > 20e9 else 256  # bf16 without AMX: ~1 GFLOP/s, a 2048 product would take 17 s
    a_pk, b_pk = torch.randn(n_pk, n_pk).to(dt), torch.randn(n_pk, n_pk).to(dt)
    rounds = {"ours": [], "theirs": [], "peak": []}
    ours.train()
    theirs.train()
    t = time_interleaved({"ours": ours_step, "theirs": theirs_step, "peak": lambda: torch.mm(a_pk, b_pk)}, steps,
                         record=rounds)
    peak = max(peak, 2 * n_pk ** 3 / t["peak"])
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    ours.eval()
    theirs.eval()
    fpt = flops_per_token(cfg, seq_len=ts)
    train_ours, train_theirs = tb * ts / t["ours"], tb * ts / t["theirs"]

    # ---------------------------------------------------------------- decode
    # Each forward call is time-stamped (the instance's forward wrapped), so one generate gives
    # the prefill time and every decode step's time (forward + that library's sampling loop).
    # Stalls from other processes only ever add time: the best step is the undisturbed cost.
    prompt = torch.randint(0, cfg.vocab_size, (db, dp), generator=g)
    gen_kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    runs = {
        "ours": (ours, lambda: ours.generate(prompt, max_new_tokens=dn)),
        "theirs": (theirs, lambda: theirs.generate(prompt, max_new_tokens=dn, min_new_tokens=dn, **gen_kw)),
    }
    if args.int8:
        import copy

        from megads.model.quant import quantize_int8

        q8 = copy.deepcopy(ours)
        quantize_int8(q8)
        runs["int8"] = (q8, lambda: q8.generate(prompt, max_new_tokens=dn))
    for m in modes:
        runs[m] = (ours, lambda m=m: ours.generate(prompt, max_new_tokens=dn, decode=m))
    prefill = {k: float("inf") for k in runs}
    steps_t = {k: [] for k in runs}
    outs = {}
    with torch.no_grad():
        for _ in range(decode_reps):
            for key, (model, gen) in runs.items():
                stamps = [time.perf_counter()]
                inner = model.forward
                static_step = key in modes  # the prefill is a forward call, the steps StaticDecode calls

                def stamped(*a, _inner=inner, _stamps=stamps, _once=static_step, **k):
                    out = _inner(*a, **k)
                    if not torch.compiler.is_compiling() and not (_once and len(_stamps) > 1):
                        _stamps.append(time.perf_counter())
                    return out

                model.forward = stamped
                step_call = StaticDecode.__call__
                if static_step:
                    def stamped_step(self, *a, _stamps=stamps, **k):
                        out = step_call(self, *a, **k)
                        _stamps.append(time.perf_counter())
                        return out

                    StaticDecode.__call__ = stamped_step
                try:
                    outs[key] = gen()
                finally:
                    del model.forward  # back to the class's forward
                    StaticDecode.__call__ = step_call
                prefill[key] = min(prefill[key], stamps[1] - stamps[0])
                steps_t[key] += [b - a for a, b in zip(stamps[1:], stamps[2:])]
        same_tokens = bool(torch.equal(outs["ours"], outs["theirs"]))
        p_ours, p_theirs = prefill["ours"], prefill["theirs"]
        dec_ours, dec_theirs = db / min(steps_t["ours"]), db / min(steps_t["theirs"])
        med_ours, med_theirs = db / statistics.median(steps_t["ours"]), db / statistics.median(steps_t["theirs"])
        fwd_ours = db * dp / time_interleaved({"fwd": lambda: ours(prompt)}, reps=decode_reps, warmup=0)["fwd"]
        peak = max(peak, matmul_peak(mm, dt))

        # ------------------------------------------------------------ KV cache per token
        cache_ours = MLACache(cfg, db, dp, dtype=dt).bytes_per_token()
        out = theirs(prompt, use_cache=True)
        hf_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        cache_theirs = hf_cache_bytes(hf_cache) / (db * dp)

    # What the ratio targets ask of this machine: the share of the measured peak that megads's
    # training step, or its decode step (rows x decode FLOPs at the decode's mean context), would
    # have to reach for the target multiple of transformers' figure in this run.
    mfu_ours, mfu_theirs = fpt * train_ours / peak, fpt * train_theirs / peak
    paired = {k: statistics.median(fpt * tb * ts / s_ / (2 * n_pk ** 3 / p_)
                                   for s_, p_ in zip(rounds[k], rounds["peak"])) for k in ("ours", "theirs")}
    step_flops = db * decode_flops_per_token(cfg, dp + dn // 2)
    step_share = {k: step_flops / min(steps_t[k]) / peak for k in ("ours", "theirs")}
    dec_target = 5 if db <= 4 else 8
    rows = [
        (f"train fwd+bwd tokens/s (B={tb}, S={ts})", f"{train_ours:,.0f}", f"{train_theirs:,.0f}",
         f"{train_ours / train_theirs:.2f}x", ">= 3x"),
        (f"train MFU (model FLOPs / measured {name} peak)", f"{100 * mfu_ours:.1f}%", f"{100 * mfu_theirs:.1f}%", "",
         ">= 75%" if name == "fp32" else ">= 35%"),
        ("  median over rounds, against the product timed beside each step", f"{100 * paired['ours']:.1f}%",
         f"{100 * paired['theirs']:.1f}%", "", ""),
        ("  3x transformers would need an MFU of", f"{300 * mfu_theirs:.0f}%", "", "", ""),
        (f"prefill tokens/s (B={db}, prompt {dp})", f"{db * dp / p_ours:,.0f}", f"{db * dp / p_theirs:,.0f}",
         f"{p_theirs / p_ours:.2f}x", ""),
        ("  megads forward without cache, same prompt", f"{fwd_ours:,.0f}", "", "", ""),
        (f"decode tokens/s (B={db}, {dn} new, greedy)", f"{dec_ours:,.1f}", f"{dec_theirs:,.1f}",
         f"{dec_ours / dec_theirs:.2f}x", ">= 5x" if db <= 4 else ">= 8x"),
        ("  (median step instead of best step)", f"{med_ours:,.1f}", f"{med_theirs:,.1f}",
         f"{med_ours / med_theirs:.2f}x", ""),
        (f"  decode step FLOPs / best step time / {name} peak", f"{100 * step_share['ours']:.1f}%",
         f"{100 * step_share['theirs']:.1f}%", "", ""),
        (f"  {dec_target}x transformers would need a step at", f"{100 * dec_target * step_share['theirs']:.0f}%",
         "", "", ""),
        (f"KV cache bytes/token ({name}, all layers)", f"{cache_ours:,}", f"{cache_theirs:,.0f}",
         f"{cache_ours / cache_theirs:.2f}x", "<= 1x"),
    ]
    if args.int8:
        dec_q8, med_q8 = db / min(steps_t["int8"]), db / statistics.median(steps_t["int8"])
        agree8 = (outs["int8"][:, dp:] == outs["ours"][:, dp:]).float().mean().item()
        rows += [(f"decode tokens/s, megads int8 weights (B={db})", f"{dec_q8:,.1f}", f"{dec_theirs:,.1f}",
                  f"{dec_q8 / dec_theirs:.2f}x ({dec_q8 / dec_ours:.2f}x megads {name})", ""),
                 ("  (median step)", f"{med_q8:,.1f}", f"{med_theirs:,.1f}", f"{med_q8 / med_theirs:.2f}x", ""),
                 ("  greedy tokens equal to megads' own", f"{100 * agree8:.0f}%", "", "", "")]
    for m in modes:
        dec_m, med_m = db / min(steps_t[m]), db / statistics.median(steps_t[m])
        same_m = bool(torch.equal(outs[m], outs["ours"]))
        rows += [(f"decode tokens/s, megads decode={m} (B={db})", f"{dec_m:,.1f}", f"{dec_theirs:,.1f}",
                  f"{dec_m / dec_theirs:.2f}x ({dec_m / dec_ours:.2f}x megads default)", ""),
                 ("  (median step)", f"{med_m:,.1f}", f"{med_theirs:,.1f}", f"{med_m / med_theirs:.2f}x", ""),
                 ("  greedy tokens equal to megads default", str(same_m), "", "", "")]
    head = ("metric", "megads", "transformers", "megads/peer", "target")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    print(f"load average before/after: {load0[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; "
          f"times are the best of interleaved repeats")
    print(f"preset {args.preset} (mtp_depth 0, seq_aux_alpha 0), {name}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; megads ops: {ops.backend()}; transformers: {impl}")
    print(f"{name} matmul peak (torch.mm up to {mm}x{mm}): {peak / 1e9:.1f} GFLOP/s (auto's start-up measurement: "
          f"fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f}); "
          f"model FLOPs/token (train, S={ts}): {fpt / 1e6:.1f} M, (decode, context {dp + dn // 2}): "
          f"{step_flops / db / 1e6:.1f} M; logits agree to {agree:.1e} rel; "
          f"greedy tokens identical: {same_tokens}")
    for r in [head] + rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if r is head:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
