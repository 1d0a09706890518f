"""Helpers of the sweep tests: the megads CLI in a subprocess, the test sweep's YAML."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def megads_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def megads(*args, timeout=600, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megads", *args], capture_output=True, text=True,
                          env=megads_env(), cwd=str(cwd), timeout=timeout)


# steps 6, 9, 40, 12 (tokens / (4 sequences x 32 tokens)): the third is long enough to be interrupted
TOKENS = [768, 1152, 5120, 1536]


def sweep_yaml(corpus: Path, out: Path, path: Path, tokens=TOKENS, extra: str = "") -> Path:
    path.write_text(f"""
sweep:
  name: test
  base: configs/tiny.yaml
  output_dir: {out}
  set:
    data.paths: [{corpus / 'ds'}]
    data.tokenizer: {corpus / 'tok'}
    data.builtin_corpus: false
    model.vocab_size: 320
    model.hidden_size: 64
    model.intermediate_size: 128
    model.moe_intermediate_size: 32
    model.num_layers: 2
    model.kv_lora_rank: 32
    model.qk_nope_head_dim: 16
    model.qk_rope_head_dim: 8
    model.v_head_dim: 16
    train.seq_len: 32
    train.micro_batch_size: 4
    train.global_batch_size: 4
    train.warmup_steps: 2
    train.eval_interval: 3
    train.eval_iters: 2
    train.save_interval: 3
    train.samples_at_end: 0
    train.progress: false
    train.tensorboard: false
    parallel.zero_stage: 0
  grid:
    sweep.tokens: {list(tokens)}
  seeds: [7]
{extra}""")
    return path


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x]
