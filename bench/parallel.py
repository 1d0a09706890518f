"""Step time, tokens/s and all-to-all bytes per token of each parallel layout beside the single
process, on this machine (gloo, CPU). Same model, data and global batch for every layout.

    python bench/parallel.py [--steps 6]
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parallel"))
sys.path.insert(0, str(ROOT))

from test_equivalence import run_layout  # noqa: E402

LAYOUTS = [("single", 1, 1, 1, 0), ("TP2", 2, 2, 1, 0), ("EP2", 2, 1, 2, 0), ("DP2 ZeRO-1", 2, 1, 1, 1),
           ("DP2 ZeRO-2", 2, 1, 1, 2), ("TP2xEP2", 4, 2, 2, 0), ("EP2xDP2 ZeRO-1", 4, 1, 2, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    extra = [f"train.max_steps={a.steps}", "model.hidden_size=128", "model.intermediate_size=384",
             "model.moe_intermediate_size=64", "model.vocab_size=1024", "train.seq_len=64",
             "train.global_batch_size=16", "train.micro_batch_size=4", "model.max_seq_len=128"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, tp, ep, zero in LAYOUTS:
            res = run_layout(world, tp, ep, zero, Path(tmp) / name.replace(" ", "_"), extra=extra)
            st = statistics.median(res["step_time"][1:])
            tps = statistics.median(res["tokens_per_s"][1:])
            a2a = statistics.mean(res["a2a"][1:])
            rows.append((name, world, st, tps, a2a))
    print(f"| layout | ranks | step time (s) | tokens/s | all-to-all bytes/token |")
    print("|---|---|---|---|---|")
    for name, world, st, tps, a2a in rows:
        print(f"| {name} | {world} | {st:.3f} | {tps:,.0f} | {a2a:,.0f} |")


if __name__ == "__main__":
    main()
