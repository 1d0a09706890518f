"""`megads launch` on a CPU machine, as `make train` runs it: 2 ranks under DeepSpeed's launcher
print the run's own lines (data, launching, run id, progress bar, evaluation, final model) and
none of the launcher's and DeepSpeed's start-up chatter; the progress bar ends before the closing
lines instead of being redrawn between them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, train_args

NOISE = ["[INFO]", "CUDA_VISIBLE_DEVICES", "Setting accelerator to CPU", "built successfully", "untested optimizer",
         "Unable to find hostfile", "FutureWarning", "is deprecated"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the quiet start-up is for CPU machines")
def test_launch_on_cpu_is_quiet(corpus, tmp_path):
    out = tmp_path / "run"
    args = train_args(corpus, out, steps=3, extra=["parallel.zero_stage=1", "train.progress=true",
                                                   "train.eval_interval=3"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "megads", "launch", *args[1:], "--nproc", "2"], cwd=str(ROOT), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    text = r.stdout  # stdout and stderr in the order they were written
    assert r.returncode == 0, text[-3000:]
    for noise in NOISE:
        assert noise not in text, (noise, text[-3000:])
    assert "launching:" in text and "--log_level error" in text
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip()]
    bar = [i for i, x in enumerate(lines) if x.startswith("train:")]
    start, valid, final = (next(i for i, x in enumerate(lines) if key in x)
                           for key in ("fresh start", "step 3: valid loss", "final model:"))
    # the bar appears after the start-up lines, ends at the last step, and is not drawn again after
    # the closing lines (into a pipe each draw is a line: the first and the last here)
    assert bar and start < bar[0] and bar[-1] < valid < final, lines
    assert "3/3" in lines[bar[-1]] and len(bar) <= 3, lines
