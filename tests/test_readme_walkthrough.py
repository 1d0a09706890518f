"""README's "Training on your own data" walkthrough, run as written: its bash block's commands and
its my-run.yaml, in a fresh directory with two small JSONL sources (the train command gets
--set overrides that make it a 3-step run of a small model), then `make train`'s report step."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=3", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.warmup_steps=1", "train.eval_interval=3", "train.eval_iters=1", "train.save_interval=3",
        "train.samples_at_end=0", "train.progress=false", "train.tensorboard=false", "model.hidden_size=64",
        "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.num_layers=2",
        "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16"]


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_own_data_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every command but `train` runs in this process (they are quick); `train` in its own."""
    from megads.cli import main

    part = section((ROOT / "README.md").read_text(), "Training on your own data")
    commands = [ln.strip() for ln in blocks(part, "bash")[0].splitlines() if ln.strip().startswith("megads ")]
    config = blocks(part, "yaml")[0]
    assert config.startswith("# my-run.yaml") and len(commands) >= 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-run.yaml").write_text(config)
    words = ["def", "return", "class", "import", "value", "alpha", "beta", "gamma"]
    for name, n in (("my_corpus.jsonl", 300), ("my_code.jsonl", 150)):
        with open(tmp_path / name, "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": " ".join(words[(i + j * 3) % len(words)] for j in range(30 + i % 20))}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    outputs = {}
    for cmd in commands:
        args = shlex.split(cmd)[1:]
        if args[0] == "train":
            args += [a for s in FAST for a in ("--set", s)]
            r = subprocess.run([sys.executable, "-m", "megads", *args], cwd=str(tmp_path), env=env,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, (cmd, r.stderr[-3000:])
            continue
        if args[0] == "preprocess":
            args += ["--workers", "1"]  # (all cores by default; one is enough for this much text)
        assert main(args) == 0, (cmd, capsys.readouterr().err)
        outputs[args[0]] = capsys.readouterr().out
    assert "(seq 512)" in outputs["model-info"]  # FLOPs at the run's own train.seq_len
    run = tmp_path / "runs" / "my-run"
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert (tmp_path / "data" / "my" / "corpus.meta.json").is_file() and (tmp_path / "data" / "my" / "code.bin").is_file()

    # `make train`'s last step: the report of the run it trained
    recipe = [ln.strip() for ln in make_train_recipe() if "megads plot" in ln]
    assert recipe == ["$(VENV)/bin/megads plot runs/tiny --out runs/tiny/report.png"]
    plot = shlex.split(recipe[0].replace("$(VENV)/bin/megads", "megads").replace("runs/tiny", str(run)))[1:]
    assert main(plot) == 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def make_train_recipe() -> list[str]:
    """The command lines of the Makefile's `train` target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("train:"))
    out = []
    for ln in lines[at + 1:]:
        if not ln.startswith("\t"):
            break
        out.append(ln)
    assert out and "megads launch configs/tiny.yaml" in out[0]
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_train_ends_with_the_report():
    r = subprocess.run(["make", "-n", "train"], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    lines = [ln for ln in r.stdout.splitlines() if "megads " in ln]
    assert lines[-2].endswith("megads launch configs/tiny.yaml --nproc 2")
    assert lines[-1].endswith("megads plot runs/tiny --out runs/tiny/report.png")
