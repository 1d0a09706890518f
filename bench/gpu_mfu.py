"""Training MFU on one device against the measured matmul peak of the dtype used, and decode
tokens/s of the plain step against the CUDA-graph step (bench/gpu_check.sh runs it on the GPU).

Training: the `gpu-1b` preset (~1B activated, ~2.8B total parameters), the dtype that
`train.precision: auto` picks on the device (where bf16 matmul is faster: as DeepSpeed's bf16 mode,
the model in bf16 with fp32 master weights and fused-AdamW state, the router and the attention
softmax of decoding in fp32, float32 buffers kept), every block through
torch.compile (`--no-compile`: eager), the native MoE kernels where they are built. MFU = model
FLOPs per token (megads.model.info: 3 x forward, causal attention) x tokens/s / the dtype's
measured torch.mm peak. Median step after the warm-up steps (compilation).

Decode (`--decode-preset`, default small): greedy generation at B=64 after a 128-token prompt,
64 new tokens, with `decode="eager"` and the fixed-shape step (`graph` on CUDA, `static` elsewhere);
both must give the same tokens.

    python bench/gpu_mfu.py                              # on the GPU
    python bench/gpu_mfu.py --device cpu --preset tiny --seq 128 --batch 2 --steps 3 --no-compile \\
        --decode-preset tiny --decode-batch 4 --decode-prompt 16 --decode-new 8   # the script itself, on CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_mfu(args, device) -> dict:
    from megads import ops
    from megads.config import load_model_preset
    from megads.model import Transformer
    from megads.model.info import flops_per_token, param_counts
    from megads.runtime.precision import DTYPES, cast_params, resolve

    cfg = load_model_preset(args.preset)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq)
    name, peaks = resolve(args.precision, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    params = list(model.parameters())
    master = params
    if name != "fp32":  # as DeepSpeed's bf16 mode: the model in bf16, fp32 master weights and state
        cast_params(model, DTYPES[name])
        master = [p.detach().float().clone() for p in params]
    if args.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW(master, lr=1e-4, fused=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    toks = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    inp, lab = toks[:, :-1], toks[:, 1:]
    times, losses = [], []
    for _ in range(args.steps + args.warmup):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(inp, labels=lab).loss
        loss.backward()
        if master is not params:
            for m, p in zip(master, params):
                m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not params:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    step = statistics.median(times[args.warmup:])
    tps = args.batch * args.seq / step
    fpt = flops_per_token(cfg, seq_len=args.seq)
    counts = param_counts(cfg)
    out = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "dtype": name, "peaks_tflops": {k: round(v / 1e12, 3) for k, v in peaks.items()},
           "compile": args.compile, "ops": ops.backend(), "batch": args.batch, "seq": args.seq,
           "active_params_b": round(counts["active_params"] / 1e9, 3),
           "total_params_b": round(counts["total_params"] / 1e9, 3),
           "first_step_s": round(times[0], 2), "step_s": round(step, 4), "tokens_per_s": round(tps, 1),
           "mfu": round(fpt * tps / peaks[name], 4), "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)]}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, opt
    return out


def decode_speed(args, device) -> dict:
    from megads.config import load_model_preset
    from megads.model import Transformer

    cfg = load_model_preset(args.decode_preset)
    cfg.mtp_depth = 0
    cfg.max_seq_len = max(cfg.max_seq_len, args.decode_prompt + args.decode_new)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).eval()
    fixed = "graph" if device.type == "cuda" else "static"
    prompt = torch.randint(0, cfg.vocab_size, (args.decode_batch, args.decode_prompt),
                           generator=torch.Generator().manual_seed(2)).to(device)
    res, outs = {}, {}
    for mode in ("eager", fixed) * 2:  # interleaved; the second round is timed (the first warms up)
        _sync(device)
        t0 = time.perf_counter()
        outs[mode] = model.generate(prompt, max_new_tokens=args.decode_new, decode=mode)
        _sync(device)
        res[mode] = args.decode_batch * args.decode_new / (time.perf_counter() - t0)
    return {"decode_preset": args.decode_preset, "rows": args.decode_batch, "prompt": args.decode_prompt,
            "new": args.decode_new, "eager_tokens_per_s": round(res["eager"], 1),
            f"{fixed}_tokens_per_s": round(res[fixed], 1), "speedup": round(res[fixed] / res["eager"], 2),
            "same_tokens": bool(torch.equal(outs["eager"], outs[fixed]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="gpu-1b")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    p.add_argument("--decode-preset", default="small")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--decode-new", type=int, default=64)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    if not args.skip_train:
        print(json.dumps(train_mfu(args, device)), flush=True)
    if not args.skip_decode:
        print(json.dumps(decode_speed(args, device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
