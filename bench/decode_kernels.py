"""Decode products on CPU: the few-row kernels and the layouts of issue 12's fourth and fifth sessions.

Four tables, all in one run on the machine at hand (float32, the `small` preset's shapes):
1. one product x W^T with R rows, weights cold (more copies than the caches hold): F.linear,
   W @ x^T, and the native megads::linear_rows, as microseconds and GB/s of weights read;
2. the routed experts' SwiGLU of one MoE layer at T decode tokens (k=4 of 16 experts): the
   grouped products, experts padded into batched matmuls, megads::expert_swiglu_rows, and what
   ops.grouped_swiglu picks; uniform routing, and a skewed one from 64 tokens;
3. one layer's decode attention over the latent cache at B rows after T tokens (caches cold: one
   per layer): the absorbed torch products (scores, masked softmax, weighted sum) and
   megads::latent_attention_rows, as ms per layer and GB/s of cache read;
4. the whole decode step of the model at B rows after a prompt, with each change turned on in
   turn (as before the fourth session -> + W @ x^T up to 128 rows -> + padded experts -> + one
   [latent | rope key] cache buffer -> + the few-row kernels -> + the decode-attention kernel ->
   + the native RMSNorm = today's default). Each row's logits are compared with the first's.
A read bandwidth (a large tensor's sum) is measured in the same run for scale.

    PYTHONPATH=. .venv/bin/python bench/decode_kernels.py        # ~4 min on 2 cores
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F


def best_of(fn, reps: int = 7, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def read_bandwidth() -> float:
    x = torch.rand(256 * 2 ** 20 // 4)
    return x.numel() * 4 / best_of(lambda: x.sum(), reps=5)


def products_table(cfg, rows_list):
    D, V = cfg.hidden_size, cfg.vocab_size
    shapes = [(D, cfg.q_lora_rank), (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim), (D, D),
              (D, cfg.intermediate_size), (cfg.intermediate_size, D), (D, V)]
    print("\n1. one product x W^T (R rows, weights cold): microseconds (GB/s of weights)")
    print("| R | W [in x out] | F.linear | W @ x^T | megads::linear_rows |")
    print("|---|---|---|---|---|")
    for R in rows_list:
        for K, N in shapes:
            copies = [torch.randn(N, K) for _ in range(max(2, 96 * 2 ** 20 // (N * K * 4)))]
            x = torch.randn(R, K)
            cells = []
            for f in (lambda w: F.linear(x, w), lambda w: torch.mm(w, x.t()).t(),
                      lambda w: torch.ops.megads.linear_rows(x, w)):
                t = best_of(lambda: [f(w) for w in copies], reps=5) / len(copies)
                cells.append(f"{t * 1e6:,.0f} ({N * K * 4 / t / 1e9:.0f})")
            print(f"| {R} | {K} x {N} | " + " | ".join(cells) + " |")


def experts_table(cfg, tokens_list, layers: int = 5):
    from megads.ops import grouped

    E, D, inter, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    W = [(0.02 * torch.randn(E, inter, D, generator=g), 0.02 * torch.randn(E, inter, D, generator=g),
          0.02 * torch.randn(E, D, inter, generator=g)) for _ in range(layers)]  # cold: one set per layer

    def grouped3(x, o, w1, w3, w2):
        h = F.silu(grouped.grouped_linear(x, w1, o)) * grouped.grouped_linear(x, w3, o)
        return grouped.grouped_linear(h, w2, o)

    ways = {"grouped products": grouped3,
            "padded batched matmuls": lambda x, o, w1, w3, w2: grouped._padded_swiglu(x, w1, w3, w2, o),
            "megads::expert_swiglu_rows": torch.ops.megads.expert_swiglu_rows,
            "ops.grouped_swiglu (what decoding runs)": lambda x, o, w1, w3, w2: grouped.grouped_swiglu(x, w1, w3, w2, o)}
    print(f"\n2. routed experts of one MoE layer ({E} experts, top-{k}, [{inter} x {D}]), weights cold: ms per layer")
    print("| T tokens | routing | expert rows | experts hit | " + " | ".join(ways) + " | max diff |")
    print("|---|---|---|---|" + "---|" * (len(ways) + 1))
    # uniform: each token's k experts at random; skewed: expert i drawn with weight exp(-0.6 i)
    # (the busiest expert gets ~a third of the rows, as an unbalanced router's decode batch)
    cases = [(T, "uniform") for T in tokens_list] + [(T, "skewed") for T in tokens_list if T >= 64]
    for T, routing in cases:
        if routing == "uniform":
            idx = torch.rand(T, E, generator=g).argsort(1)[:, :k]
        else:
            weights = torch.exp(-0.6 * torch.arange(E, dtype=torch.float64)).expand(T, E)
            idx = torch.multinomial(weights, k, replacement=False, generator=g)
        flat = idx.reshape(-1)
        x = torch.randn(T, D, generator=g)[flat.argsort(stable=True) // k].contiguous()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(flat, minlength=E).cumsum(0)])
        cells, outs = [], []
        with torch.no_grad():
            for f in ways.values():
                cells.append(f"{best_of(lambda: [f(x, offsets, *w) for w in W]) / layers * 1e3:.3f}")
                outs.append(f(x, offsets, *W[0]))
        diff = max((o - outs[0]).abs().max().item() for o in outs)
        hit = int((offsets[1:] > offsets[:-1]).sum())
        print(f"| {T} | {routing} | {T * k} | {hit} | " + " | ".join(cells) + f" | {diff:.1e} |")


def attention_table(cfg, shapes, layers: int = 6):
    from megads.model.mla import _masked_softmax

    H, C, V = cfg.num_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    g = torch.Generator().manual_seed(0)

    def torch_path(q, joint, keep):  # MLA._attend_absorbed's products for one query position
        s = torch.bmm(joint, q.transpose(1, 2)).transpose(1, 2) * scale  # [B, h, T]
        p = _masked_softmax(s, keep[:, None, :])
        return torch.bmm(p, joint[..., :V])

    def kernel(q, joint, keep):
        return torch.ops.megads.latent_attention_rows(q, joint, keep, V, scale)

    print(f"\n3. one layer's decode attention over the latent cache ({H} heads, rows of {C} floats), caches "
          "cold: ms per layer (GB/s of cache read)")
    print("| B rows | T cached | absorbed torch products | megads::latent_attention_rows | speed-up | max diff |")
    print("|---|---|---|---|---|---|")
    for B, T in shapes:
        caches = [torch.randn(B, T, C, generator=g) for _ in range(max(layers, 96 * 2 ** 20 // (B * T * C * 4)))]
        q = torch.randn(B, H, C, generator=g)
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[0, : T // 4] = False  # a left-padded row
        cells, outs, times = [], [], []
        with torch.no_grad():
            for f in (torch_path, kernel):
                t = best_of(lambda: [f(q, c, keep) for c in caches], reps=5) / len(caches)
                times.append(t)
                cells.append(f"{t * 1e3:.3f} ({B * T * C * 4 / t / 1e9:.0f})")
                outs.append(f(q, caches[0], keep))
        diff = (outs[1] - outs[0]).abs().max().item()
        print(f"| {B} | {T} | " + " | ".join(cells) + f" | {times[0] / times[1]:.2f}x | {diff:.1e} |")


@contextlib.contextmanager
def settings(transposed_rows: int, padded: bool, joint: bool, kernels: bool, attention: bool = False,
             rmsnorm: bool = False):
    """Turn the fourth and fifth sessions' decode changes on or off (module constants; restored after)."""
    from megads.model import cache as cache_mod
    from megads.model import norm
    from megads.model.mla import MLA
    from megads.ops import grouped
    from megads.parallel import tensor

    saved = (tensor.ROWS_TRANSPOSED, tensor.ROWS_KERNEL, grouped.SWIGLU_ROWS, grouped.PADDED_ROWS,
             cache_mod.LayerCache.joint, MLA._attend_rows, norm.row_kernels)
    tensor.ROWS_TRANSPOSED = (32, transposed_rows)
    tensor.ROWS_KERNEL = tensor.ROWS_KERNEL if kernels else 0
    grouped.SWIGLU_ROWS = grouped.SWIGLU_ROWS if kernels else 0
    grouped.PADDED_ROWS = grouped.PADDED_ROWS if padded else (1 << 62, 0)
    if not joint:
        cache_mod.LayerCache.joint = lambda self, end: None
    if not attention:
        MLA._attend_rows = lambda self, *a: None
    if not rmsnorm:
        norm.row_kernels = lambda *a: False
    try:
        yield
    finally:
        (tensor.ROWS_TRANSPOSED, tensor.ROWS_KERNEL, grouped.SWIGLU_ROWS, grouped.PADDED_ROWS,
         cache_mod.LayerCache.joint, MLA._attend_rows, norm.row_kernels) = saved


STAGES = [("as before the fourth session", dict(transposed_rows=32, padded=False, joint=False, kernels=False)),
          ("+ W @ x^T up to 128 rows", dict(transposed_rows=128, padded=False, joint=False, kernels=False)),
          ("+ padded experts (64-512 rows)", dict(transposed_rows=128, padded=True, joint=False, kernels=False)),
          ("+ one [latent | rope] cache buffer", dict(transposed_rows=128, padded=True, joint=True, kernels=False)),
          ("+ native few-row kernels", dict(transposed_rows=128, padded=True, joint=True, kernels=True)),
          ("+ decode-attention kernel", dict(transposed_rows=128, padded=True, joint=True, kernels=True,
                                             attention=True)),
          ("+ native RMSNorm (default)", dict(transposed_rows=128, padded=True, joint=True, kernels=True,
                                              attention=True, rmsnorm=True))]


def step_table(cfg, shapes, reps: int):
    from megads.model import Transformer
    from megads.model.cache import new_cache

    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    print("\n4. the model's decode step (eager), each change added in turn: best (median) ms per step, "
          "interleaved repeats")
    print("| B rows, prompt | " + " | ".join(name for name, _ in STAGES) + " | default vs before | max logit diff |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    for B, P in shapes:
        prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
        times = {name: [] for name, _ in STAGES}
        logits = {}
        with torch.no_grad():
            cache = new_cache(cfg, B, P + 8)
            model(prompt, cache=cache)
            for _ in range(reps):
                for name, kw in STAGES:
                    with settings(**kw):
                        cache.length = P  # the same step again: rewrite position P
                        t = time.perf_counter()
                        out = model(prompt[:, -1:], cache=cache)
                        times[name].append(time.perf_counter() - t)
                    logits[name] = out.logits if hasattr(out, "logits") else out
        first = STAGES[0][0]
        cells = []
        for name, _ in STAGES:
            v = sorted(times[name])
            cells.append(f"{v[0] * 1e3:.1f} ({v[len(v) // 2] * 1e3:.1f})")
        gain = min(times[first]) / min(times[STAGES[-1][0]])
        diff = max((logits[n] - logits[first]).abs().max().item() for n, _ in STAGES)
        print(f"| {B}, {P} | " + " | ".join(cells) + f" | {gain:.2f}x | {diff:.1e} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="one shape per table (a smoke run)")
    p.add_argument("--skip-products", action="store_true", help="leave out table 1")
    args = p.parse_args(argv)

    from megads import ops
    from megads.config import load_model_preset
    from megads.ops import native

    ops.set_backend("native")
    if not native.has_row_kernels():
        raise SystemExit("the native library has no few-row kernels: rebuild it (pip install -e . or make)")
    cfg = load_model_preset(args.preset)
    cfg.mtp_depth, cfg.seq_aux_alpha = 0, 0.0
    cfg.max_seq_len = max(cfg.max_seq_len, 1100)
    print(f"preset {args.preset}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"read bandwidth (sum of 256 MB) {read_bandwidth() / 1e9:.1f} GB/s")
    if args.quick:
        products_table(cfg, [4])
        experts_table(cfg, [4])
        attention_table(cfg, [(4, 64)], layers=2)
        step_table(cfg, [(4, 64)], reps=2)
        return 0
    products_table(cfg, [1, 4, 16, 64]) if not args.skip_products else None
    experts_table(cfg, [1, 4, 16, 64, 128])
    attention_table(cfg, [(1, 1024), (4, 1024), (16, 512), (64, 160), (4, 4096)])
    step_table(cfg, [(1, 1024), (4, 1024), (16, 512), (64, 160)], reps=args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
