"""Rejection sampling (`megads rejection-sample CONFIG`), the step of DeepSeek-R1 between
reasoning RL and the final SFT: sample N completions per prompt from a checkpoint, score them with
the rule rewards, keep the verified, well-formed, language-consistent ones (every reward named in
`rejection.require` at or above its threshold), at most K distinct ones per prompt, and write them
as chat JSONL ready for `train.stage: sft`, with a stats file beside it: the histogram of passing
samples per prompt and the kept / dropped counts by reason.

It runs in any launcher's layout (TP/EP ranks decode in lockstep, data-parallel ranks take
different prompts); the checkpoint is read in that layout (a `final/` or HF dir by any layout, a
training checkpoint by its own). Rank 0 writes the files, atomically; an existing output is kept
unless --force.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megads.errors import ConfigError, MegadsError

REASONS = ("cannot_judge", "not_verified", "bad_format", "language", "other_reward", "duplicate", "over_keep")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def judge(texts: list[str], per: dict, require: dict, keep: int) -> tuple[list[int], dict, int]:
    """One prompt's N completions -> (indices kept, drop counts by reason, number passing)."""
    drops = dict.fromkeys(REASONS, 0)
    passing, seen, kept = 0, set(), []
    reason_of = {"accuracy": "not_verified", "format": "bad_format", "language": "language"}
    for i, text in enumerate(texts):
        why = None
        for name, thr in require.items():
            v = per[name][i]
            if np.isnan(v):
                why = "cannot_judge"
                break
            if v < thr:
                why = reason_of.get(name, "other_reward")
                break
        if why is not None:
            drops[why] += 1
            continue
        passing += 1
        key = _norm(text)
        if key in seen:
            drops["duplicate"] += 1
        elif len(kept) >= keep:
            drops["over_keep"] += 1
        else:
            seen.add(key)
            kept.append(i)
    return kept, drops, passing


def run_rejection(config_path, overrides, force: bool = False) -> int:
    from megads.config import load_config
    from megads.data.tokenizer import load_tokenizer
    from megads.parallel import state as pstate
    from megads.rl import rewards
    from megads.rl.rollout import row_generators, sample_groups
    from megads.rl.tasks import load_tasks, render_prompt
    from megads.train import init

    cfg = load_config(config_path, overrides)
    r, g = cfg.rejection, cfg.grpo
    if not r.checkpoint:
        raise ConfigError("rejection.checkpoint: the model to sample from is required")
    if not r.output:
        raise ConfigError("rejection.output: the JSONL file to write is required")
    out = Path(r.output)
    stats_path = out.with_name(out.name + ".stats.json")
    if out.exists() and not force:
        raise ConfigError(f"rejection.output: {out} exists; it is kept (pass --force to replace it)")
    from megads.train.objectives.grpo import check_rewards

    check_rewards(g)
    for name in r.require:
        try:
            rewards.get(name)  # unknown names: one line, before any work
        except ValueError as e:
            raise ConfigError(f"rejection.require: {e}") from None
    pstate.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        ps = pstate.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
        rank = dist.get_rank() if dist.is_initialized() else 0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        tok = load_tokenizer(cfg.data.tokenizer or r.checkpoint)
        cfg.model.vocab_size = init.model_config_of(r.checkpoint).vocab_size
        model = init.build_frozen(r.checkpoint, cfg, ps, device, what="rejection.checkpoint")
        spec = r.tasks or g.tasks or (cfg.data.paths[0] if cfg.data.paths else "")
        if not spec:
            raise ConfigError("rejection.tasks: which prompts to sample (a builtin task family or a JSONL)")
        tasks = [t for t in load_tasks(spec, seed=cfg.train.seed) if r.split == "all" or t.get("split", "train") == r.split]
        if r.max_prompts:
            tasks = tasks[:r.max_prompts]
        if not tasks:
            raise ConfigError(f"rejection.split: no {r.split} prompts in {spec}")
        dp, dp_rank = ps.layout.dp, ps.dp_rank
        mine = list(range(dp_rank, len(tasks), dp))
        per_batch = r.prompts_per_batch
        rounds = -(-((len(tasks) + dp - 1) // dp) // per_batch)
        t0 = time.perf_counter()
        results = {}  # task index -> (kept texts, drops, passing)
        n_tokens = 0
        for k in range(rounds):
            idx = mine[k * per_batch:(k + 1) * per_batch]
            real = len(idx)
            idx = (idx or [0]) + [(idx or [0])[-1]] * (per_batch - max(real, 1))
            gens = row_generators(r.seed, 0, [(i, j) for i in idx for j in range(r.num_samples)])
            ro = sample_groups(model, tok, [render_prompt(tok, tasks[i]["prompt"], g.template) for i in idx],
                               r.num_samples, max_new_tokens=g.max_new_tokens, temperature=r.temperature,
                               top_p=r.top_p, stops=list(g.stop), generators=gens, sync=True, device=device,
                               decode=g.rollout_decode)
            n_tokens += int(ro.completion_mask[:real * r.num_samples].sum())
            N = r.num_samples
            rows = [tasks[i] for i in idx[:real] for _ in range(N)]
            _, per = rewards.score(ro.texts[:real * N], rows, dict.fromkeys(r.require, 1.0), default_lang=g.lang,
                                   workers=g.reward_workers)
            for j, i in enumerate(idx[:real]):
                texts = ro.texts[j * N:(j + 1) * N]
                kept, drops, passing = judge(texts, {n: np.asarray(v)[j * N:(j + 1) * N] for n, v in per.items()},
                                             r.require, r.keep)
                results[i] = ([texts[x] for x in kept], drops, passing)
        parts = [(results, n_tokens)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (results, n_tokens))
        if rank == 0:
            merged = {}
            for res, _ in parts:
                merged.update(res)  # the TP ranks of one data-parallel rank hold the same entries
            tokens = sum(n for _, n in parts) // ps.layout.tp
            _write(out, stats_path, tasks, merged, r, time.perf_counter() - t0, tokens)
            print(f"rejection-sample: {sum(len(v[0]) for v in merged.values())} completions kept from "
                  f"{len(tasks)} prompts x {r.num_samples} samples -> {out} (stats: {stats_path})")
        if dist.is_initialized():
            dist.barrier()
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _write(out: Path, stats_path: Path, tasks, merged, r, seconds: float, tokens: int) -> None:
    hist = [0] * (r.num_samples + 1)
    drops = dict.fromkeys(REASONS, 0)
    lines = []
    for i in sorted(merged):
        kept, d, passing = merged[i]
        hist[passing] += 1
        for k, v in d.items():
            drops[k] += v
        prompt = tasks[i]["prompt"]
        user = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        for text in kept:
            lines.append(json.dumps({"messages": user + [{"role": "assistant", "content": text.strip()}],
                                     "answer": tasks[i].get("answer")}) + "\n")
    total = len(merged) * r.num_samples
    stats = {"prompts": len(merged), "samples": total, "kept": len(lines), "dropped": drops,
             "pass_rate": sum(h * k for k, h in enumerate(hist)) / max(1, total),
             "pass_histogram": {str(k): h for k, h in enumerate(hist)},  # prompts with k passing samples
             "prompts_with_any_kept": sum(1 for v in merged.values() if v[0]), "seconds": seconds,
             "tokens_per_s": tokens / max(seconds, 1e-9), "require": r.require, "num_samples": r.num_samples,
             "keep": r.keep, "temperature": r.temperature}
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, "".join(lines)), (stats_path, json.dumps(stats, indent=1) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
