"""A tokenizer for the arithmetic tasks, and a small model config, for the GRPO tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["model.vocab_size=320", "model.hidden_size=64", "model.intermediate_size=128",
         "model.moe_intermediate_size=32", "model.num_layers=2", "model.kv_lora_rank=32",
         "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.max_seq_len=128"]


def run_megads(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megads", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout)


@pytest.fixture(scope="session")
def arith_tok(tmp_path_factory):
    from megads.data.tokenizer import train_tokenizer
    from megads.rl.tasks import R1_ZERO_TEMPLATE, arith

    d = tmp_path_factory.mktemp("arith_tok")
    with open(d / "text.jsonl", "w") as f:
        for r in arith(400, 10, seed=5):
            f.write(json.dumps({"text": R1_ZERO_TEMPLATE.format(prompt=r["prompt"]) + " " + r["solution"]}) + "\n")
    train_tokenizer([str(d / "text.jsonl")], 320, d / "tok", split_digits=True)
    return d / "tok"
