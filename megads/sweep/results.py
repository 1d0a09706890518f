"""What a finished run measured, from its metrics.jsonl and config: one row of results.csv.

A resumed run logs the steps it redoes again, so the last record of each step counts. Figures:

- final_train_loss: main-token loss (lm_loss: MTP and balance terms left out) averaged over the
  last 5% of steps (one step's loss is noisy); final_valid_loss: the last evaluation (the trainer
  evaluates at max_steps), main-token loss too.
- tokens_per_s, mfu: medians over the steps after the first 10% (start-up and warm-up excluded);
  the trainer's mfu counts the MTP modules' FLOPs and is against the measured peak of its dtype.
- expert_load_max_over_mean: the busiest expert's load over the mean (the worst MoE layer of the
  step's global batch), averaged over the last quarter of the steps; 1.0 is perfect balance.
- flops: training FLOPs = (flops_per_token + mtp_flops_per_token) x tokens, from model-info at the
  run's train.seq_len; tokens = steps x global_batch_size x seq_len.
- wall_s: the sweep's wall clock for the point over all its attempts; train_s: the sum of the
  step times (no start-up, evaluation or checkpoints).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from megads.errors import MegadsError

COLUMNS = ["point", "group", "seed", "status", "ranks", "launcher", "layout", "attention", "total_params",
           "active_params", "non_embedding_params", "mtp_params", "kv_cache_bytes_per_token", "flops_per_token",
           "steps", "tokens", "flops", "final_train_loss", "final_valid_loss", "final_mtp_loss", "tokens_per_s",
           "mfu", "expert_load_max_over_mean", "wall_s", "train_s"]


def read_run(run_dir: str | Path) -> dict:
    """{"steps": per-step records, "valid": eval records, "experts": expert-load records} of a run,
    the last record of each step kept. MegadsError when the dir has no metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MegadsError(f"{run_dir}: no metrics.jsonl (not a megads run dir, or the run has not logged a step yet)")
    steps, valid, experts = {}, {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            if "loss" in rec:
                steps[rec["step"]] = rec
            if any(k.startswith("valid_") for k in rec):
                valid[rec["step"]] = {**valid.get(rec["step"], {}), **rec}
            if "expert_load" in rec:
                experts[rec["step"]] = rec
    order = lambda d: [d[k] for k in sorted(d)]  # noqa: E731
    return {"steps": order(steps), "valid": order(valid), "experts": order(experts)}


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(xs)) if xs else float("nan")


def point_row(sw, p, record: dict) -> dict:
    """The results.csv row of point `p` (metrics empty unless it is done)."""
    from megads.config import load_config
    from megads.model.info import model_info

    cfg = load_config(sw.base, p.overrides)
    m, t, par = cfg.model, cfg.train, cfg.parallel
    info = model_info(m, t.seq_len)
    f_main, f_mtp = info["flops_per_token"], info["mtp_flops_per_token"]
    row = {"point": p.name, "group": p.group, "seed": p.seed, "ranks": p.nproc, "launcher": p.launcher,
           "layout": f"tp{par.tp}-pp{par.pp}-ep{par.ep}-z{par.zero_stage}", "attention": m.attention,
           "total_params": info["total_params"], "active_params": info["active_params"],
           "non_embedding_params": info["active_params"] - info["embedding_params"],
           "mtp_params": info["mtp_params"], "kv_cache_bytes_per_token": info["kv_cache_bytes_per_token"],
           "flops_per_token": f_main + f_mtp, "steps": t.max_steps,
           "tokens": t.max_steps * t.global_batch_size * t.seq_len,
           "wall_s": record.get("seconds", float("nan"))}
    row["flops"] = float(row["tokens"]) * row["flops_per_token"]
    row.update({k: v for k, v in p.varied.items() if k != "train.seed"})
    row["status"] = "done" if record.get("done") else ("failed" if record.get("exit_code") else "pending")
    if not record.get("done"):
        return row
    run = read_run(p.out)
    steps = run["steps"]
    n = len(steps)
    last = steps[-max(1, n // 20):]
    settled = [r for r in steps if r["step"] > 0.1 * n] or steps
    quarter = steps[-max(1, n // 4):]
    main = "lm_loss" if steps and "lm_loss" in steps[0] else "loss"
    losses = [r["valid_loss"] for r in run["valid"] if "valid_loss" in r]
    row.update({
        "final_train_loss": _mean(r.get(main) for r in last),
        "final_valid_loss": losses[-1] if losses else float("nan"),
        "final_mtp_loss": _mean(r.get("mtp_loss") for r in last) if m.mtp_depth else float("nan"),
        "tokens_per_s": _median(r.get("tokens_per_s") for r in settled),
        "mfu": _median(r.get("mfu") for r in settled),  # (the trainer counts the MTP modules' FLOPs)
        "expert_load_max_over_mean": _mean(r.get("expert_load_max_over_mean") for r in quarter),
        "train_s": float(sum(r.get("step_time_s", 0.0) for r in steps)),
    })
    return row


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS with the varied keys (section.field) after the identity columns."""
    varied = sorted({k for r in rows for k in r if "." in k})
    return COLUMNS[:4] + varied + COLUMNS[4:]


def write_csv(rows: list[dict], path: Path) -> None:
    cols = columns(rows)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                            else r.get(k)) for k in cols})
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    """results.csv back as rows of numbers where a cell holds one."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v != "" else float("nan")
                except ValueError:
                    row[k] = v
            out.append(row)
    return out
