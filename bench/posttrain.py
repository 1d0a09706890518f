"""Post-training stages on this machine, each beside its peer in the same run (one process):

- SFT, packed (per-document attention, padding-free rows) vs padded (one sample a row), on the
  builtin docstring -> function chats (real, skewed lengths: many short functions, a few long);
  useful (non-padding) tokens/s and the padding share;
- DPO with the precomputed reference (one model) vs the resident one (a frozen second model):
  step time and peak RSS;
- logit distillation (teacher twice the student's width) vs SFT on the same data: step time.

    python bench/posttrain.py [--steps 12] [--seq-len 512]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, sets: list[str], steps: int, log: list | None = None) -> list[dict]:
    base = ["--set", f"train.max_steps={steps}", "--set", f"train.output_dir={out}", "--set", "train.progress=false",
            "--set", "train.save_interval=100000", "--set", "train.eval_interval=100000", "--set",
            "train.tensorboard=false", "--set", "parallel.zero_stage=0", "--set", "train.samples_at_end=0"]
    cmd = [sys.executable, "-m", "megads", "train", "configs/sft/tiny.yaml", *base,
           *[a for s in sets for a in ("--set", s)], "--resume", "none"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{sets} failed:\n{r.stderr[-3000:]}")
    if log is not None:
        log.append(r.stdout)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def med(recs, key, skip=2):
    return statistics.median(x[key] for x in recs[skip:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=400, help="DPO pairs (the first pass covers them all)")
    a = ap.parse_args()
    common = [f"train.seq_len={a.seq_len}", "train.micro_batch_size=4", "train.global_batch_size=4"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"| SFT ({a.seq_len} tokens a row, batch 4) | rows/s | useful tokens/s | padding share | step time (s) |")
        print("|---|---|---|---|---|")
        sft = {}
        for name, pack in (("packed", "true"), ("padded", "false")):
            recs = run(tmp / name, [*common, f"sft.packing={pack}"], a.steps)
            st = med(recs, "step_time_s")
            eff = statistics.mean(x["packing_efficiency"] for x in recs)
            useful = med(recs, "tokens_per_s") * eff
            sft[name] = (useful, st)
            print(f"| {name} | {4 / st:.1f} | {useful:,.0f} | {1 - eff:.1%} | {st:.3f} |")
        print(f"\npacked / padded useful tokens/s: {sft['packed'][0] / sft['padded'][0]:.2f}x\n")

        from megads.config import load_config
        from megads.data import builtin_paths
        from megads.data.examples import build_preference_jsonl

        pairs = build_preference_jsonl(tmp / "pairs.jsonl", max_samples=a.pairs)
        tok_dir = builtin_paths(load_config(ROOT / "configs" / "sft" / "tiny.yaml").data)[1]
        print(f"| DPO ({a.pairs} pairs: builtin functions vs corrupted copies) | step time (s) | peak RSS (MB) | "
              f"first pass (s) |")
        print("|---|---|---|---|")
        dpo_sets = ["train.stage=dpo", f"train.seq_len={a.seq_len}", "train.micro_batch_size=2",
                    "train.global_batch_size=2", f"data.cache_dir={tmp / 'cache'}", f"data.paths={pairs}",
                    f"data.tokenizer={tok_dir}"]
        for ref in ("precomputed", "resident"):
            logs: list = []
            recs = run(tmp / f"dpo-{ref}", [*dpo_sets, f"dpo.reference={ref}"], a.steps, logs)
            m = re.search(r"first pass over \d+ pairs in ([0-9.]+) s", logs[0])
            print(f"| reference {ref} | {med(recs, 'step_time_s'):.3f} | {max(x['peak_rss_mb'] for x in recs):,.0f} | "
                  f"{m.group(1) if m else '-'} |")

        # a teacher twice the student's width (random weights: the cost is what is measured)
        from megads.model import Transformer
        from megads.model.io import save_model

        cfg = load_config(ROOT / "configs" / "sft" / "tiny.yaml").model
        cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size = (2 * cfg.hidden_size,
                                                                               2 * cfg.intermediate_size,
                                                                               2 * cfg.moe_intermediate_size)
        teacher = save_model(Transformer(cfg), tmp / "teacher")
        print("\n| stage (same data and batch) | step time (s) | tokens/s |")
        print("|---|---|---|")
        for name, sets in (("SFT", common), ("distill (forward KL, teacher 2x wide)",
                                             [*common, "train.stage=distill", f"distill.teacher={teacher}"])):
            recs = run(tmp / name.split()[0], sets, a.steps)
            print(f"| {name} | {med(recs, 'step_time_s'):.3f} | {med(recs, 'tokens_per_s'):,.0f} |")


if __name__ == "__main__":
    main()
