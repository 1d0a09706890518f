"""Training throughput on this machine: tokens/s and MFU of `make train`'s job (configs/tiny.yaml)
and of the `small` preset, with 1 rank (plain python) and 2 ranks (DeepSpeed launcher), same run.

MFU = model FLOPs per token (megads.model.info, 3 x forward) x tokens/s / (measured fp32 matmul
rate x ranks). Medians over the steps after the first two (warm-up).
--malloc both: each job twice, alternating, with MEGADS_MALLOC=keep (the default: glibc keeps freed
memory, megads.runtime.hardware) and =system (glibc's own trimming; pages fault in again each step).

    python bench/train.py [--steps 12] [--malloc keep|system|both]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOBS = {
    "tiny (make train)": ["configs/tiny.yaml"],
    "small": ["configs/tiny.yaml", "--set", "model.preset=small", "--set", "train.seq_len=256",
              "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=8"],
}


def run(job, ranks, steps, out, malloc="keep"):
    sets = ["--set", f"train.max_steps={steps}", "--set", f"train.output_dir={out}", "--set", "train.progress=false",
            "--set", "train.save_interval=100000", "--set", "train.eval_interval=100000",
            "--set", "train.samples_at_end=0", "--set", "train.tensorboard=false"]
    args = ["train"] + JOBS[job] + sets + ["--resume", "none"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEGADS_MALLOC=malloc)
    if ranks == 1:
        cmd = [sys.executable, "-m", "megads"] + args
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--no_local_rank",
               "--module", "megads"] + args
    r = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{job} x{ranks} failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    recs = recs[2:] or recs
    return (statistics.median(x["tokens_per_s"] for x in recs), statistics.median(x["mfu"] for x in recs),
            recs[0]["peak_flops"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--malloc", choices=("keep", "system", "both"), default="keep")
    a = ap.parse_args()
    modes = ("keep", "system") if a.malloc == "both" else (a.malloc,)
    subprocess.run([sys.executable, "-m", "megads", "prepare-data", "configs/tiny.yaml"], cwd=str(ROOT), check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
    print("| job | ranks | MEGADS_MALLOC | tokens/s | MFU | peak measured at start (GFLOP/s, per rank) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for job in JOBS:
            for ranks in (1, 2):
                for m in modes:
                    tps, mfu, peak = run(job, ranks, a.steps, Path(tmp) / f"{job[:5]}{ranks}{m}", m)
                    print(f"| {job} | {ranks} | {m} | {tps:,.0f} | {100 * mfu:.1f}% | {peak / 1e9:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
