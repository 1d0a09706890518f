"""One GRPO training step: megads (`megads train`, train.stage grpo) vs TRL's GRPOTrainer
(transformers generate, no vLLM), from the same weights, in one run on this machine (CPU, fp32).

Both sides start from one randomly initialised model of a megads preset (mtp_depth 0,
seq_aux_alpha 0, so megads and transformers' DeepseekV3ForCausalLM compute the same thing),
exported once with megads.hf.megads_to_hf: megads loads it with train.init_from, TRL with
DeepseekV3ForCausalLM.from_pretrained (the two models' logits are checked to agree first).
Each optimizer step of either side:
- samples G completions of each of P prompts (the builtin arithmetic tasks, megads/rl/tasks.py,
  under the R1-Zero template; the same prompts in the same order on both sides), temperature 1,
  top-p 1, max_new_tokens T, no stop strings; TRL also gets min_new_tokens = T, so its
  completions are exactly T tokens; megads cannot suppress EOS, which a random model samples
  rarely (the mean completion lengths are printed, and the tokens/s rows count real tokens);
- scores them with megads's rewards (accuracy 1.0 + format 0.5, megads.rl.rewards.score, 2
  threads; TRL through a reward function calling it on the completions decoded the same way);
- takes one optimizer step on all P x G completions (micro-batches of --micro-batch,
  gradient accumulation to the full batch; beta 0, one iteration, so neither side runs an extra
  log-prob pass: group-std advantages, clip 0.2, per-sequence token-mean loss = TRL's
  loss_type "grpo"); AdamW (0.9, 0.95), lr 2e-5 constant, weight decay 0, grad clip 1.0.

Times per step: megads from its metrics.jsonl (step_time_s: rollout + rewards + fwd/bwd +
optimizer; time/generate_s), TRL from a callback (on_step_begin -> on_step_end) and a wrapper
round model.generate. Runs alternate (megads, TRL) for --rounds rounds; the first --warmup steps
of every run are dropped and the medians of the rest are reported.

    PYTHONPATH=. .venv/bin/python bench/grpo.py            # ~5-6 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/grpo.py --quick    # ~1 min

On a machine shared with another busy process pass --threads 1: two OpenMP threads on two
contended cores stall at every barrier (a tiny decode ran 250x slower than on one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warnings

import numpy as np
import torch

from megads.runtime.hardware import add_malloc_argument, bench_malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import matmul_peak  # noqa: E402  (bench/model.py: the same peak measurement)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/grpo/tiny.yaml"
REWARDS = {"accuracy": 1.0, "format": 0.5}
LR = 2e-5


def prompt_order(n: int, seed: int) -> np.ndarray:
    """The order megads's GRPO objective draws the train prompts in (GRPOObjective.prepare)."""
    return np.random.default_rng(seed).permutation(n)


# ---------------------------------------------------------------------------------- megads

def run_megads(out: Path, hf_dir: Path, tok_dir: str, a, steps: int) -> list[dict]:
    sets = [f"train.init_from={hf_dir}", f"data.tokenizer={tok_dir}", "data.builtin_corpus=false",
            "model.seq_aux_alpha=0", f"model.max_seq_len={a.max_seq_len}",
            f"grpo.group_size={a.group_size}", f"train.global_batch_size={a.prompts * a.group_size}",
            f"train.micro_batch_size={a.micro_batch}", f"grpo.max_new_tokens={a.max_new_tokens}",
            "grpo.stop=[]", "grpo.temperature=1.0", "grpo.top_p=1.0", "grpo.beta=0.0", "grpo.iterations=1",
            "grpo.eval_prompts=1", "grpo.reward_workers=2", f"train.seed={a.seed}",
            f"train.lr={LR:.1e}", f"train.min_lr={LR:.1e}", "train.warmup_steps=0", "train.weight_decay=0.0",
            f"train.max_steps={steps}", f"train.output_dir={out}", "train.progress=false",
            "train.save_interval=100000", "train.eval_interval=100000", "train.tensorboard=false",
            "parallel.zero_stage=0", "train.samples_at_end=0", f"grpo.rollout_decode={a.rollout_decode}",
            f"grpo.share_prompts={str(not a.no_share_prompts).lower()}"]
    cmd = [sys.executable, "-m", "megads", "train", CONFIG, *[x for s in sets for x in ("--set", s)],
           "--resume", "none"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(a.threads))  # the loop honours it
    r = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"megads train failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in x]
    n = a.prompts * a.group_size
    return [{"step_s": x["step_time_s"], "gen_s": x["time/generate_s"], "reward_s": x["time/reward_s"],
             "tokens": x["rollout/length_mean"] * n, "completions": n} for x in recs]


# ---------------------------------------------------------------------------------- TRL

def run_trl(out: Path, hf_dir: Path, tok, records: list[dict], a, steps: int) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megads.rl import rewards
    from megads.rl.rollout import completion_text
    from megads.rl.tasks import R1_ZERO_TEMPLATE

    n = a.prompts * a.group_size
    order = prompt_order(len(records), a.seed)
    rows = [records[int(order[i % len(order)])] for i in range(steps * a.prompts)]
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""  # as megads's render_prompt
    ds = Dataset.from_list([{"prompt": bos + R1_ZERO_TEMPLATE.format(prompt=r["prompt"]), "answer": r["answer"],
                             "lang": r.get("lang", "en")} for r in rows])

    times = {"reward": []}
    want = [x["prompt"] for x in ds for _ in range(a.group_size)]  # megads's prompts, step by step

    def megads_rewards(prompts, completions, completion_ids, answer, lang, **_):
        t = time.perf_counter()
        k = len(times["reward"]) * n
        assert list(prompts) == want[k:k + n], f"TRL step {len(times['reward'])}: not megads's prompts"
        texts = [completion_text(tok, list(ids), [], tok.eos_id) for ids in completion_ids]
        total, _per = rewards.score(texts, [{"answer": x, "lang": y} for x, y in zip(answer, lang)], REWARDS,
                                    workers=2)
        times["reward"].append(time.perf_counter() - t)
        return [float(x) for x in total]

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

    cfg = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=n // a.micro_batch, num_generations=a.group_size,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": a.max_new_tokens}, use_vllm=False,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=steps, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0, seed=a.seed,
    )
    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    proc = AutoTokenizer.from_pretrained(hf_dir)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[megads_rewards], args=cfg, train_dataset=ds,
                          processing_class=proc, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line
    gens = []
    inner = trainer.model.generate
    eos = torch.tensor(trainer.eos_token_ids)

    def timed_generate(*args, **kw):
        t = time.perf_counter()
        res = inner(*args, **kw)
        dt = time.perf_counter() - t
        comp = res[:, kw["input_ids"].shape[1]:]
        is_eos = torch.isin(comp, eos)
        # tokens up to and including the first EOS (TRL's completion mask)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((comp.shape[0],), comp.shape[1]))
        gens.append((dt, int(first.sum()), comp.shape[0]))
        return res

    trainer.model.generate = timed_generate
    torch.set_num_threads(a.threads)  # (Trainer may touch the thread count)
    trainer.train()
    assert len(gens) == steps, f"expected one generate call per step, got {len(gens)} for {steps} steps"
    assert all(g[2] == n for g in gens), f"generate batches {[g[2] for g in gens]}, expected {n} rows"
    steps_s = [e - b for b, e in zip(clock.begin, clock.end)]
    return [{"step_s": s, "gen_s": g[0], "reward_s": r, "tokens": g[1], "completions": n}
            for s, g, r in zip(steps_s, gens, times["reward"])]


# ---------------------------------------------------------------------------------- main

def shared_prefill(model, prompts: list[list[int]], pad: int, a) -> dict:
    """One step's rollout through megads.model.generate with each prompt prefilled once
    (share_prompts, the default) and with every row prefilled (as transformers' generate does):
    best of 3 alternated calls each, the same per-row generators, tokens compared."""
    from megads.model.generate import generate
    from megads.rl.rollout import row_generators

    rows = [p for p in prompts for _ in range(a.group_size)]
    S = max(len(r) for r in rows)
    tokens = torch.full((len(rows), S), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, S - len(r):] = torch.tensor(r)
    mask = tokens != pad
    best, outs = {True: float("inf"), False: float("inf")}, {}
    for _ in range(3):
        for share in (False, True):
            gens = row_generators(a.seed, 0, [(i // a.group_size, i % a.group_size) for i in range(len(rows))])
            t = time.perf_counter()
            outs[share] = generate(model, tokens, max_new_tokens=a.max_new_tokens, temperature=1.0,
                                   attention_mask=mask, pad_token_id=pad, generator=gens, share_prompts=share)
            best[share] = min(best[share], time.perf_counter() - t)
    return {"per_row": best[False], "shared": best[True], "equal": bool(torch.equal(outs[True], outs[False])),
            "rows": len(rows), "S": S, "tokens": outs[True], "mask": mask}


def packed_logprobs(model, share: dict, a) -> dict:
    """The log-prob forward+backward of one step's rollout (share's tokens; every completion token
    kept) in micro-batches of --micro-batch rows, as GRPO runs it: every row whole, and each
    prompt once for its completions in the micro-batch (grpo.share_prompts, megads.rl.pack).
    Best of 3 alternated passes; the largest log-prob difference of the two."""
    from megads.rl.pack import pack_rows, shared_runs, unpack_segments

    x, pmask = share["tokens"], share["mask"]
    S = pmask.shape[1]
    attn = torch.cat([pmask, torch.ones(x.shape[0], x.shape[1] - S, dtype=torch.bool)], dim=1)
    positions = (attn.long().cumsum(-1) - 1).clamp_min(0)
    labels = x[:, 1:].clone()
    labels[:, :S - 1] = -100
    model.train()
    best, out = {1: float("inf"), 0: float("inf")}, {}
    for _ in range(3):
        for packed in (0, 1):
            t = time.perf_counter()
            parts = []
            for m in range(0, x.shape[0], a.micro_batch):
                sl = slice(m, m + a.micro_batch)
                rows = (x[sl, :-1], labels[sl], positions[sl, :-1], attn[sl, :-1])
                g = shared_runs(rows[0][:, :S - 1], rows[3][:, :S - 1], S - 1) if packed else 1
                kw = {"token_losses": True, "loss_from": S - 1}
                if g > 1:
                    rows = pack_rows(S - 1, g, *rows)
                    kw["shared_prefix"] = (S - 1, g)
                tl = model(rows[0], rows[1], positions=rows[2], attention_mask=rows[3], **kw).token_losses
                tl = unpack_segments(tl, g) if g > 1 else tl
                tl.sum().backward()
                parts.append(tl.detach())
            best[packed] = min(best[packed], time.perf_counter() - t)
            out[packed] = torch.cat(parts)
            model.zero_grad(set_to_none=True)
    model.eval()
    return {"rows": best[0], "packed": best[1], "diff": float((out[0] - out[1]).abs().max()),
            "group": min(a.group_size, a.micro_batch)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, ~1 min)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; quick 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default 64; quick 32)")
    p.add_argument("--micro-batch", type=int, default=16, help="completions per forward/backward")
    p.add_argument("--steps", type=int, default=None, help="steps per run, warm-up included (default 8; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped from each run (default 2; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="megads, TRL runs alternated (default 2; quick 1)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of both sides (default: all cores, what `megads train` takes); on a "
                        "machine shared with another busy process use fewer: oversubscribed OpenMP stalls")
    p.add_argument("--rollout-decode", default="auto", choices=("auto", "eager", "static", "compile"),
                   help="megads's grpo.rollout_decode (compile: the decode step through torch.compile, compiled "
                        "in the first, dropped, steps)")
    add_malloc_argument(p)  # this process (TRL) and megads train's (MEGADS_MALLOC passed on)
    p.add_argument("--no-share-prompts", action="store_true",
                   help="megads's log-prob forward runs every row whole (grpo.share_prompts=false)")
    a = p.parse_args(argv)
    q = a.quick
    a.prompts = a.prompts or (4 if q else 8)
    a.max_new_tokens = a.max_new_tokens or (32 if q else 64)
    a.steps = a.steps or (4 if q else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.rounds = a.rounds or (1 if q else 2)
    n = a.prompts * a.group_size
    a.micro_batch = min(a.micro_batch, n)
    if n % a.micro_batch:
        raise SystemExit(f"--micro-batch {a.micro_batch} must divide the {n} completions of a step")
    if a.steps <= a.warmup:
        raise SystemExit("--steps must exceed --warmup")
    torch.set_num_threads(a.threads)
    print(bench_malloc(a.malloc))
    load0 = os.getloadavg()
    t_start = time.perf_counter()

    import transformers
    import trl
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    from megads import hf
    from megads.config import load_config, load_model_preset
    from megads.data import prepare_builtin
    from megads.data.tokenizer import load_tokenizer
    from megads.model import Transformer
    from megads.rl.tasks import load_tasks, render_prompt

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames (gradient_checkpointing)
    peak = matmul_peak(1024 if q else 2048)

    data_cfg = load_config(ROOT / CONFIG).data
    data_cfg.data_dir = str(ROOT / data_cfg.data_dir)
    tok_dir = prepare_builtin(data_cfg)[1]  # the builtin tokenizer (built once, reused)
    tok = load_tokenizer(tok_dir)
    records = [r for r in load_tasks(load_config(ROOT / CONFIG).grpo.tasks, seed=a.seed) if r["split"] == "train"]
    order = prompt_order(len(records), a.seed)
    plen = [len(render_prompt(tok, records[int(i)]["prompt"], "r1-zero")) for i in order[:a.steps * a.prompts]]
    a.max_seq_len = max(load_model_preset(a.preset).max_seq_len, max(plen) + a.max_new_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_model_preset(a.preset)
        cfg.mtp_depth, cfg.seq_aux_alpha, cfg.max_seq_len = 0, 0.0, a.max_seq_len
        torch.manual_seed(a.seed)
        ours = Transformer(cfg).eval()
        hf_dir = tmp / "hf"
        hf.megads_to_hf(ours, hf_dir, tokenizer=tok_dir)
        theirs = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        x = torch.tensor([render_prompt(tok, records[0]["prompt"], "r1-zero")])
        with torch.no_grad():
            la, lb = ours(x), theirs(x).logits
        agree = ((la - lb).abs().max() / lb.abs().max()).item()
        assert agree < 1e-4, f"megads and transformers disagree on the exported weights (rel err {agree:.2e})"
        impl = f"attn={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"
        n_params = sum(t.numel() for t in ours.parameters())
        pad = tok.pad_id if tok.pad_id is not None else 0
        share = shared_prefill(ours, [render_prompt(tok, records[int(i)]["prompt"], "r1-zero")
                                      for i in order[:a.prompts]], pad, a)
        pack = packed_logprobs(ours, share, a)
        del ours, theirs

        res = {"megads": [], "TRL": []}
        for r in range(a.rounds):
            t = time.perf_counter()
            res["megads"] += run_megads(tmp / f"megads-{r}", hf_dir, tok_dir, a, a.steps)[a.warmup:]
            t_m = time.perf_counter() - t
            t = time.perf_counter()
            res["TRL"] += run_trl(tmp / f"trl-{r}", hf_dir, tok, records, a, a.steps)[a.warmup:]
            print(f"round {r + 1}/{a.rounds}: megads run {t_m:.0f} s, TRL run {time.perf_counter() - t:.0f} s "
                  f"({a.steps} steps each)", flush=True)
        peak = max(peak, matmul_peak(1024 if q else 2048))

    def med(side, fn):
        return statistics.median(fn(x) for x in res[side])

    m = {}
    for side in res:
        m[side] = {
            "step": med(side, lambda x: x["step_s"]),
            "gen": med(side, lambda x: x["gen_s"]),
            "reward": med(side, lambda x: x["reward_s"]),
            "train": med(side, lambda x: x["step_s"] - x["gen_s"] - x["reward_s"]),
            "gen_tps": med(side, lambda x: x["tokens"] / x["gen_s"]),
            "cps": med(side, lambda x: x["completions"] / x["step_s"]),
            "tps": med(side, lambda x: x["tokens"] / x["step_s"]),
            "len": statistics.mean(x["tokens"] / x["completions"] for x in res[side]),
        }
    M, T = m["megads"], m["TRL"]

    def faster(key, lower_better):
        return f"{(T[key] / M[key]) if lower_better else (M[key] / T[key]):.2f}x"

    rows = [
        ("step time (s)", f"{M['step']:.3f}", f"{T['step']:.3f}", faster("step", True), ""),
        ("  rollout (generate) (s)", f"{M['gen']:.3f}", f"{T['gen']:.3f}", faster("gen", True), ""),
        ("  rewards (s)", f"{M['reward']:.3f}", f"{T['reward']:.3f}", faster("reward", True), ""),
        ("  log-probs fwd+bwd + optimizer, the rest (s)", f"{M['train']:.3f}", f"{T['train']:.3f}",
         faster("train", True), ""),
        ("rollout tokens/s (completion tokens / generate time)", f"{M['gen_tps']:,.0f}", f"{T['gen_tps']:,.0f}",
         faster("gen_tps", False), ""),
        ("step throughput: completions/s", f"{M['cps']:.2f}", f"{T['cps']:.2f}", faster("cps", False), ">= 3x"),
        ("step throughput: completion tokens/s", f"{M['tps']:,.1f}", f"{T['tps']:,.1f}", faster("tps", False),
         ">= 3x"),
        ("mean completion length (tokens)", f"{M['len']:.2f}", f"{T['len']:.2f}", "", f"max {a.max_new_tokens}"),
    ]
    head = ("metric (median of steps)", "megads", "TRL GRPOTrainer", "megads/TRL", "target")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    print(f"load average before/after: {load0[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; "
          f"{a.rounds} round(s) of (megads run, TRL run), {a.steps} steps a run, first {a.warmup} dropped: "
          f"{len(res['megads'])} steps a side; total {time.perf_counter() - t_start:.0f} s")
    print(f"preset {a.preset} ({n_params / 1e6:.1f} M params, mtp_depth 0, seq_aux_alpha 0), fp32, "
          f"{a.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__} ({impl}, no vLLM); logits agree to {agree:.1e} rel")
    print(f"per step: {a.prompts} prompts x G={a.group_size} = {n} completions, prompts {min(plen)}-{max(plen)} "
          f"tokens (R1-Zero template, arith), max_new_tokens {a.max_new_tokens}, micro-batch {a.micro_batch} "
          f"(x{n // a.micro_batch} accumulation), one optimizer step, beta 0, megads rollout_decode "
          f"{a.rollout_decode}; "
          f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    for r in [head] + rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if r is head:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"\nmegads rollout of one step's prompts ({share['rows']} rows = {a.prompts} prompts x G={a.group_size}, "
          f"left-padded to {share['S']} tokens, {a.max_new_tokens} new, generate, best of 3): every row prefilled "
          f"{share['per_row']:.3f} s, each prompt prefilled once (share_prompts, the default) {share['shared']:.3f} s "
          f"({share['per_row'] / share['shared']:.2f}x); tokens equal: {share['equal']}")
    print(f"megads log-prob forward+backward of that rollout (micro-batches of {a.micro_batch}, best of 3): "
          f"every row whole {pack['rows']:.3f} s, each prompt once for its {pack['group']} completions in a "
          f"micro-batch (grpo.share_prompts, the default) {pack['packed']:.3f} s ({pack['rows'] / pack['packed']:.2f}x); "
          f"largest log-prob difference {pack['diff']:.1e}")
    ratio = M["tps"] / T["tps"]
    print(f"\ntarget megads >= 3x TRL step throughput (completion tokens/s): {ratio:.2f}x -> "
          f"{'met' if ratio >= 3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
