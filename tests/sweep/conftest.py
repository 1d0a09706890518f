"""A small corpus and one real 4-point sweep (interrupted at its third point, then resumed), shared
by the sweep and plot tests."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from sweep_helpers import ROOT, megads, megads_env, metric_steps, sweep_yaml


@pytest.fixture(scope="session")
def sweep_corpus(tmp_path_factory):
    """tokenizer + indexed dataset of a few hundred small documents (in process: fast)."""
    from megads.data.preprocess import preprocess
    from megads.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("sweep_corpus")
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"]
    with open(d / "train.jsonl", "w") as f:
        for i in range(300):
            doc = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 30))
            f.write(json.dumps({"text": f"# doc {i}\n{doc}\n"}) + "\n")
    train_tokenizer([str(d / "train.jsonl")], 320, d / "tok")
    preprocess([str(d / "train.jsonl")], d / "tok", d / "ds", workers=1)
    return d


@pytest.fixture(scope="session")
def sweep_run(sweep_corpus, tmp_path_factory):
    """Run the sweep, SIGTERM it during its third point, run it again. Returns a dict with the
    output dir, the two runs' outputs and exit codes, and the finished points' metrics before the
    rerun (to show they were not redone)."""
    d = tmp_path_factory.mktemp("sweep")
    out = d / "out"
    spec = sweep_yaml(sweep_corpus, out, d / "sweep.yaml")
    third = out / "points" / "tokens-5120_seed-7"
    log = d / "first.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "megads", "sweep", str(spec)], stdout=f, stderr=subprocess.STDOUT,
                             env=megads_env(), cwd=str(ROOT), start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            if len(metric_steps(third)) >= 2:
                p.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        code1 = p.wait(timeout=300)
    first = log.read_text()
    before = {name: (out / "points" / name / "metrics.jsonl").read_bytes()
              for name in ("tokens-768_seed-7", "tokens-1152_seed-7")
              if (out / "points" / name / "metrics.jsonl").is_file()}
    stopped_at = metric_steps(third)
    r = megads("sweep", str(spec))
    return {"corpus": sweep_corpus, "dir": d, "out": out, "spec": spec, "code1": code1, "first": first, "code2": r.returncode,
            "second": r.stdout + r.stderr, "before": before, "third": third, "stopped_at": stopped_at}
