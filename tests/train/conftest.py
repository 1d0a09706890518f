"""A small real corpus (tokenizer + indexed dataset made with megads's own CLI) for trainer tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAULTSITE = ROOT / "tests" / "faultsite"


def faults_env(spec: str) -> dict:
    """Environment that loads tests/faultsite/sitecustomize.py with MEGADS_TEST_FAULTS=spec (a
    slowed, failing or killed checkpoint write; see that file)."""
    return {"MEGADS_TEST_FAULTS": spec, "PYTHONPATH": f"{FAULTSITE}{os.pathsep}{ROOT}"}


def megads(*args, env=None, timeout=600, **kw):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "megads", *args], capture_output=True, text=True, env=e,
                          cwd=str(ROOT), timeout=timeout, **kw)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = []
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"]
    for i in range(400):
        doc = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 30))
        lines.append(json.dumps({"text": f"# doc {i}\n{doc}\n"}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    r = megads("tokenizer", "train", "--input", str(d / "train.jsonl"), "--vocab-size", "320", "--output", str(d / "tok"))
    assert r.returncode == 0, r.stderr
    r = megads("preprocess", "--input", str(d / "train.jsonl"), "--tokenizer", str(d / "tok"),
               "--output-prefix", str(d / "ds"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    return d


def train_args(corpus, out, steps=6, extra=()):
    sets = [f"data.paths=[{corpus / 'ds'}]", f"data.tokenizer={corpus / 'tok'}", "data.builtin_corpus=false",
            "model.vocab_size=320", "model.hidden_size=64", "model.intermediate_size=128",
            "model.moe_intermediate_size=32", "model.num_layers=2", "model.kv_lora_rank=32",
            "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
            f"train.max_steps={steps}", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.warmup_steps=2", "train.save_interval=2", "train.eval_interval=3", "train.eval_iters=2",
            "train.samples_at_end=1", "train.sample_tokens=8", "train.progress=false", f"train.output_dir={out}",
            "parallel.zero_stage=0", *extra]
    return ["train", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def step_losses(out):
    """step -> loss, the last record of each step (a resumed run re-logs the steps it redoes)."""
    losses = {}
    for line in Path(out, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6): the losses other runs are compared with."""
    out = tmp_path_factory.mktemp("ref")
    r = megads(*train_args(corpus, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, step_losses(out), r
