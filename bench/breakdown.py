"""Where the time goes: a per-module profile of one training step and one decode step.

Module hooks time each part's forward (forward pre-hook .. forward hook) and, in the training
step, its backward (full backward pre-hook .. full backward hook), on the `small` preset in the
dtype `train.precision: auto` picks here (both matmul peaks printed). Parts: embedding,
attention (MLA), the two RMSNorms, the MoE router (gate), routed experts, shared experts, the
dense MLP, final norm + head; "MoE dispatch" is the MoE layer's time outside its gate, experts
and shared experts (permute, unpermute, counts); "rest" is the step's wall time outside every
part (loss, residual adds, autograd bookkeeping; in the training step, also the AdamW step, which
is timed on its own). Each figure is the best of --reps runs' per-part sums.

    PYTHONPATH=. .venv/bin/python bench/breakdown.py [--compile]   # ~2 min on 2 cores (+3 with --compile)
"""
from __future__ import annotations

import argparse
import collections
import re
import time

import warnings

import torch

from megads.runtime.hardware import add_malloc_argument, bench_malloc

PARTS = {"embed": "embedding", "attn": "attention (MLA)", "attn_norm": "RMSNorm", "ffn_norm": "RMSNorm",
         "gate": "MoE router", "experts": "MoE routed experts", "shared": "MoE shared experts",
         "mlp": "dense MLP", "norm": "final norm + head", "head": "final norm + head"}


class Timer:
    def __init__(self, model):
        self.fwd = collections.Counter()
        self.bwd = collections.Counter()
        self.moe_fwd = collections.Counter()
        self.moe_bwd = collections.Counter()
        self._t0 = {}
        for name, mod in model.named_modules():
            m = re.fullmatch(r"(embed|norm|head)|layers\.\d+\.(attn|attn_norm|ffn_norm|ffn)(?:\.(gate|experts|shared))?",
                             name)
            if not m:
                continue
            top, part, sub = m.groups()
            if top:
                self._hook(mod, name, PARTS[top])
            elif sub:
                self._hook(mod, name, PARTS[sub])
            elif part == "ffn":
                self._hook(mod, name, "MoE layer" if hasattr(mod, "gate") else PARTS["mlp"])
            else:
                self._hook(mod, name, PARTS[part])

    def _hook(self, mod, key, label):
        def pre(m, *a):
            self._t0[(key, "f")] = time.perf_counter()

        def post(m, *a):
            self.fwd[label] += time.perf_counter() - self._t0.pop((key, "f"))

        def bpre(m, *a):
            self._t0[(key, "b")] = time.perf_counter()

        def bpost(m, *a):
            if (key, "b") in self._t0:
                self.bwd[label] += time.perf_counter() - self._t0.pop((key, "b"))

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)
        mod.register_full_backward_pre_hook(bpre)
        mod.register_full_backward_hook(bpost)

    def table(self, counter, wall):
        moe = counter.pop("MoE layer", 0.0)
        inner = sum(counter[k] for k in (PARTS["gate"], PARTS["experts"], PARTS["shared"]))
        if moe:
            counter["MoE dispatch (permute/unpermute)"] = max(0.0, moe - inner)
        counter["rest"] = max(0.0, wall - sum(counter.values()))
        return counter


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="also time the training step with compiled blocks")
    p.add_argument("--skip-train", action="store_true", help="the decode step only (bf16 where it is slow)")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    print(bench_malloc(args.malloc))
    from megads.config import load_model_preset
    from megads.model import Transformer
    from megads.model.cache import new_cache
    from megads.runtime.precision import DTYPES, cast_params, resolve

    used, peaks = resolve(args.precision)
    dtype = DTYPES[used]
    cfg = load_model_preset(args.preset)
    cfg.mtp_depth, cfg.seq_aux_alpha = 0, 0.0
    cfg.max_seq_len = max(cfg.max_seq_len, args.prompt + 8, args.seq)
    torch.manual_seed(0)
    model = cast_params(Transformer(cfg), dtype)
    timer = Timer(model)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    print(f"preset {args.preset}, {used} ({'bf16' if used == 'bf16' else 'fp32'} weights), "
          f"{torch.get_num_threads()} threads; matmul peaks fp32 {peaks['fp32'] / 1e9:,.0f}, bf16 "
          f"{peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    if not args.skip_train:
        train_profile(model, timer, toks, args.reps)

    # ------------------------------------------------------------------ decode
    model.eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g)
    best = None
    with torch.no_grad():
        for _ in range(args.reps + 1):
            cache = new_cache(cfg, args.batch, args.prompt + 8, dtype=dtype)
            model(prompt, cache=cache)
            nxt = prompt[:, -1:]
            timer.fwd.clear()
            t = time.perf_counter()
            model(nxt, cache=cache)
            run = (time.perf_counter() - t, dict(timer.fwd))
            if best is None or run[0] < best[0]:
                best = run
    wall, fwd = best
    fwd = timer.table(collections.Counter(fwd), wall)
    moved, copy_bw = decode_bytes(model, cfg, args.batch, args.prompt, dtype), copy_bandwidth()
    print(f"\ndecode step B={args.batch} after {args.prompt} tokens: {wall * 1e3:,.1f} ms "
          f"({args.batch / wall:,.0f} tokens/s); it reads at least {moved / 1e6:,.1f} MB (weights it uses, "
          f"the cache): {moved / wall / 1e9:,.1f} GB/s against a measured copy bandwidth of "
          f"{copy_bw / 1e9:,.1f} GB/s ({100 * moved / wall / copy_bw:.0f}%)")
    print("| part | ms | share |")
    print("|---|---|---|")
    for k in sorted(fwd, key=lambda k: -fwd[k]):
        print(f"| {k} | {fwd[k] * 1e3:,.2f} | {100 * fwd[k] / wall:.0f}% |")
    if args.compile:
        compiled_vs_eager(cfg, dtype, toks, args.reps)
    return 0


def train_profile(model, timer, toks, reps):
    """The training step's table: forward, backward (per part) and the AdamW step."""
    from megads.config import TrainConfig
    from megads.train.optim import build_optimizer

    opt = build_optimizer(model, TrainConfig())

    best = None
    for _ in range(reps + 1):  # the first is a warm-up
        timer.fwd.clear(), timer.bwd.clear()
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = model(toks[:, :-1], labels=toks[:, 1:]).loss
        t_f = time.perf_counter()
        loss.backward()
        t_b = time.perf_counter()
        opt.step()
        t_o = time.perf_counter()
        run = (t_o - t, t_f - t, t_b - t_f, t_o - t_b, dict(timer.fwd), dict(timer.bwd))
        if best is None or run[0] < best[0]:
            best = run
    wall, wf, wb, wo, fwd, bwd = best
    fwd = timer.table(collections.Counter(fwd), wf)
    bwd = timer.table(collections.Counter(bwd), wb)
    print(f"\ntraining step B={toks.shape[0]} S={toks.shape[1] - 1}: {wall * 1e3:,.0f} ms (forward {wf * 1e3:,.0f}, "
          f"backward {wb * 1e3:,.0f}, AdamW {wo * 1e3:,.0f}); {toks.shape[0] * (toks.shape[1] - 1) / wall:,.0f} tokens/s")
    print("| part | forward ms | backward ms | share of step |")
    print("|---|---|---|---|")
    for k in sorted(set(fwd) | set(bwd), key=lambda k: -(fwd[k] + bwd[k])):
        print(f"| {k} | {fwd[k] * 1e3:,.1f} | {bwd[k] * 1e3:,.1f} | {100 * (fwd[k] + bwd[k]) / wall:.0f}% |")
    print(f"| AdamW step | | | {100 * wo / wall:.0f}% |")
    # the same update with torch's for-loop AdamW (one host read of each parameter's step count)
    loop = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False, fused=False)
    loop.step()
    t = time.perf_counter()
    loop.step()
    print(f"AdamW over {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters: fused (megads) "
          f"{wo * 1e3:,.0f} ms, torch's for-loop implementation {(time.perf_counter() - t) * 1e3:,.0f} ms")
    ce_compare(model, toks, reps)
    attention_compare(model, toks, reps)


def attention_compare(model, toks, reps):
    """One layer's attention core (softmax(q k^T) v, causal), forward + backward and forward alone:
    megads::causal_attention (what the step runs in float32/float64 on CPU with the native ops)
    against SDPA (values padded to the keys' head dim for its fused kernel, as megads did before);
    best of reps + 1 each, alternated. Two shapes: the step's, and one sequence of 2,048 tokens with
    one head (a rank's share under TP=8 at micro-batch 1: fewer (batch, head) pairs than threads,
    where the kernel splits each pair's query blocks over the threads)."""
    from megads.model.mla import native_attention

    attn, (B, S) = model.layers[0].attn, toks[:, :-1].shape
    h, dq, dv = attn.n_heads, attn.nope + attn.rope, attn.vdim
    dtype = next(model.parameters()).dtype
    if not native_attention(torch.empty(0, dtype=dtype)):
        print("attention core: the native kernel does not apply here (dtype or ops backend); SDPA runs")
        return
    for b, s, heads in ((B, S, h), (1, 2048, 1)):
        both, fwd = _time_core(b, s, heads, dq, dv, attn.scale, dtype, reps)
        flops = 2 * b * heads * s * (s + 1) / 2 * (dq + dv)  # the forward's; forward + backward: 3x
        print(f"attention core of one layer [B={b}, S={s}, {heads} head{'s' * (heads > 1)}, qk {dq}, v {dv}], "
              f"{torch.get_num_threads()} threads, forward + backward: "
              + ", ".join(f"{n} {t * 1e3:,.1f} ms ({3 * flops / t / 1e9:,.0f} GFLOP/s)" for n, t in both.items())
              + "; forward: " + ", ".join(f"{n} {t * 1e3:,.1f} ms" for n, t in fwd.items()))


def _time_core(B, S, h, dq, dv, scale, dtype, reps):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(B, S, h, dq, generator=g).to(dtype) for _ in range(2))
    v, grad = (torch.randn(B, S, h, dv, generator=g).to(dtype) for _ in range(2))

    def core(name, a, b, c):
        if name == "megads":
            return torch.ops.megads.causal_attention(a, b, c, None, scale)[0]
        return F.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2),
                                              F.pad(c, (0, dq - dv)).transpose(1, 2), is_causal=True,
                                              scale=scale)[..., :dv].transpose(1, 2)

    both = {"megads": float("inf"), "SDPA": float("inf")}
    fwd = dict(both)
    for _ in range(reps + 1):
        for name in both:
            a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
            t = time.perf_counter()
            core(name, a, b, c).backward(grad)
            both[name] = min(both[name], time.perf_counter() - t)
            with torch.no_grad():
                t = time.perf_counter()
                core(name, q, k, v)
                fwd[name] = min(fwd[name], time.perf_counter() - t)
    return both, fwd


def ce_compare(model, toks, reps):
    """The step's cross entropy over the vocabulary, forward + backward from the head's logits:
    megads's (in the logits' own storage) against F.cross_entropy (a log-softmax, a zero-filled
    gradient and a log-softmax backward, each [B*S, V]); best of reps + 1 each, alternated."""
    import torch.nn.functional as F

    from megads.parallel.tensor import vocab_parallel_cross_entropy

    with torch.no_grad():
        h = model.norm(model._embed(toks[:, :-1])).detach()
    labels = toks[:, 1:].reshape(-1)
    best = {"megads": float("inf"), "F.cross_entropy": float("inf")}
    for _ in range(reps + 1):
        for name in best:
            leaf = h.clone().requires_grad_()
            logits = model.head(leaf)
            logits = logits.reshape(-1, logits.shape[-1])
            t = time.perf_counter()
            if name == "megads":
                loss = vocab_parallel_cross_entropy(logits, labels, owned=True)
            else:
                loss = F.cross_entropy(logits.float(), labels, reduction="none")
            loss.sum().backward()
            best[name] = min(best[name], time.perf_counter() - t)
    n, v = labels.numel(), model.cfg.vocab_size
    print(f"cross entropy over [{n:,}, {v:,}] logits, forward + backward (the head's backward products "
          f"included): megads {best['megads'] * 1e3:,.0f} ms, F.cross_entropy {best['F.cross_entropy'] * 1e3:,.0f} ms")


def copy_bandwidth(mb: int = 256) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of 5."""
    src = torch.ones(mb * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


@torch.no_grad()
def decode_bytes(model, cfg, batch, prompt, dtype) -> int:
    """The least a decode step must read: every non-expert weight (the embedding: its B rows),
    the routed experts the step's tokens select (counted by running one step with the gates
    watched), and the cache of every layer."""
    from megads.model.cache import new_cache

    chosen = []
    hooks = [m.ffn.gate.register_forward_hook(lambda mod, a, out: chosen.append(out[1].unique().numel()))
             for m in model.layers if m.is_moe]
    cache = new_cache(cfg, batch, prompt + 2, dtype=dtype)
    x = torch.randint(0, cfg.vocab_size, (batch, prompt))
    model(x, cache=cache)
    chosen.clear()
    model(x[:, -1:], cache=cache)
    for h in hooks:
        h.remove()
    size = torch.finfo(dtype).bits // 8
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        total += (batch * p.shape[1] if name.startswith("embed") else p.numel()) * size
    if cfg.tie_embeddings:  # the head reads the whole shared matrix
        total += model.embed.weight.numel() * size
    per_expert = sum(p[0].numel() for n, p in model.layers[[b.is_moe for b in model.layers].index(True)]
                     .ffn.experts.named_parameters()) * size
    total += sum(chosen) * per_expert
    total += cache.bytes_per_token() * batch * (prompt + 1)
    return total


def compiled_vs_eager(cfg, dtype, toks, reps):
    """Training step (forward + backward) with every block through torch.compile (train.compile)
    against the same model eager, interleaved, best of reps; the first compiled call is timed
    separately (compilation)."""
    from megads.model import Transformer
    from megads.runtime.precision import cast_params

    torch.manual_seed(0)
    eager = cast_params(Transformer(cfg), dtype)
    comp = cast_params(Transformer(cfg), dtype)
    comp.load_state_dict(eager.state_dict())
    comp.compile_blocks()

    def step(m):
        m.zero_grad(set_to_none=True)
        t = time.perf_counter()
        m(toks[:, :-1], labels=toks[:, 1:]).loss.backward()
        return time.perf_counter() - t

    first = step(comp)
    step(eager)
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(reps):
        best["eager"] = min(best["eager"], step(eager))
        best["compiled"] = min(best["compiled"], step(comp))
    n = toks.shape[0] * (toks.shape[1] - 1)
    print(f"\ntraining fwd+bwd, B={toks.shape[0]} S={toks.shape[1] - 1}: eager {best['eager'] * 1e3:,.0f} ms "
          f"({n / best['eager']:,.0f} tokens/s), compiled blocks {best['compiled'] * 1e3:,.0f} ms "
          f"({n / best['compiled']:,.0f} tokens/s, {best['eager'] / best['compiled']:.2f}x); "
          f"first compiled step {first:,.1f} s (compilation)")


if __name__ == "__main__":
    raise SystemExit(main())
