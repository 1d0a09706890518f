"""bench/gpu_mfu.py (run by bench/gpu_check.sh on a GPU) runs here on the CPU at tiny sizes: its
training loop learns, its MFU is a fraction of the measured peak, and the fixed-shape decode step
it times gives the plain step's tokens."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_mfu_script_on_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "bench/gpu_mfu.py", "--device", "cpu", "--preset", "tiny", "--seq", "64",
                        "--batch", "2", "--steps", "3", "--warmup", "1", "--no-compile", "--decode-preset", "tiny",
                        "--decode-batch", "3", "--decode-prompt", "8", "--decode-new", "6"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train, decode = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
    assert train["dtype"] == "fp32" and train["preset"] == "tiny" and not train["compile"]
    assert 0 < train["mfu"] < 1 and train["tokens_per_s"] > 0
    assert train["loss_first_last"][1] < train["loss_first_last"][0]  # 4 AdamW steps on one batch
    assert decode["same_tokens"] is True and decode["static_tokens_per_s"] > 0


def test_gpu_mfu_script_bf16_master_weights_on_cpu():
    """The bf16 path the GPU takes (bf16 model, fp32 master weights and AdamW state) trains too."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "bench/gpu_mfu.py", "--device", "cpu", "--preset", "tiny", "--seq", "32",
                        "--batch", "2", "--steps", "2", "--warmup", "1", "--no-compile", "--precision", "bf16",
                        "--skip-decode"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads(r.stdout.strip().splitlines()[-1])
    assert train["dtype"] == "bf16" and train["loss_first_last"][1] < train["loss_first_last"][0]
