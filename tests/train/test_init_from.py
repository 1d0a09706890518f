"""train.init_from: a run's final/ (read shard by shard under TP) and an HF export of it start a
new stage from the same weights: equal first losses, far below a fresh model's, TP2 = 1 process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, megads, step_losses, train_args


def _two_ranks(args):
    port = 20000 + os.getpid() % 20000
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                           str(port), "--no_local_rank", "--module", "megads", *args], cwd=str(ROOT), env=e,
                          capture_output=True, text=True, timeout=600)


def test_init_from_megads_and_hf_dirs(corpus, reference, tmp_path):
    ref_out, ref_losses, _ = reference
    final = ref_out / "final"
    extra = [f"train.init_from={final}", "train.save_interval=100"]
    r = megads(*train_args(corpus, tmp_path / "a", steps=2, extra=extra))
    assert r.returncode == 0, r.stderr[-3000:]
    a = step_losses(tmp_path / "a")
    assert a[1] < ref_losses[1] - 0.5  # it starts from the trained weights, not a fresh init
    for name, layout in (("tp", "parallel.tp=2"),):  # final/ read slice by slice
        r = _two_ranks(train_args(corpus, tmp_path / name, steps=2, extra=[*extra, layout]))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        got = step_losses(tmp_path / name)
        for s in a:
            assert got[s] == pytest.approx(a[s], rel=1e-5), (name, a, got)
    r = megads("convert", "megads-to-hf", str(final), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = megads(*train_args(corpus, tmp_path / "b", steps=2, extra=[f"train.init_from={tmp_path / 'hf'}",
                                                                   "train.save_interval=100"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert step_losses(tmp_path / "b")[1] == pytest.approx(a[1], rel=1e-5)
    # the HF directory read tensor by tensor into TP and EP shards (each rank keeps its experts)
    # and into pipeline stages (each rank reads only its stage's tensors)
    for name, layout in (("hf_tp", "parallel.tp=2"), ("hf_ep", "parallel.ep=2"), ("hf_pp", "parallel.pp=2")):
        r = _two_ranks(train_args(corpus, tmp_path / name, steps=2, extra=[f"train.init_from={tmp_path / 'hf'}",
                                                                          "train.save_interval=100", layout]))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        got = step_losses(tmp_path / name)
        for s in a:
            assert got[s] == pytest.approx(a[s], rel=1e-5), (name, a, got)


def test_init_from_a_training_checkpoint_in_any_layout(corpus, reference, tmp_path):
    """A step-N checkpoint (sharded, DCP) starts a stage like its run's final/: in the layout that
    wrote it and under another one (TP2: each rank reads its slices)."""
    ck = reference[0] / "checkpoints" / "step-6"  # the same weights as its run's final/
    r = megads(*train_args(corpus, tmp_path / "f", steps=2, extra=[f"train.init_from={reference[0] / 'final'}",
                                                                   "train.save_interval=100"]))
    assert r.returncode == 0, r.stderr[-3000:]
    r = megads(*train_args(corpus, tmp_path / "c", steps=2, extra=[f"train.init_from={ck}", "train.save_interval=100"]))
    assert r.returncode == 0, r.stderr[-3000:]
    f, c = step_losses(tmp_path / "f"), step_losses(tmp_path / "c")
    for s in f:
        assert c[s] == pytest.approx(f[s], rel=1e-6), (f, c)
    r = _two_ranks(train_args(corpus, tmp_path / "x", steps=2, extra=[f"train.init_from={ck}", "parallel.tp=2",
                                                                   "train.save_interval=100"]))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    x = step_losses(tmp_path / "x")
    for s in f:
        assert x[s] == pytest.approx(f[s], rel=1e-5), (f, x)


def test_init_from_errors(corpus, reference, tmp_path):
    r = megads(*train_args(corpus, tmp_path / "d", extra=[f"train.init_from={reference[0] / 'final'}",
                                                          "model.hidden_size=96"]))
    assert r.returncode == 2 and "model.hidden_size" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_init_from_an_ep2_training_checkpoint(corpus, tmp_path):
    """Expert shards come from the sharded files: EP2 step-N == EP2 from the run's final/."""
    r = _two_ranks(train_args(corpus, tmp_path / "ep", steps=4, extra=["parallel.ep=2"]))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = {}
    for name, src in (("from_ck", tmp_path / "ep" / "checkpoints" / "step-4"), ("from_final", tmp_path / "ep" / "final")):
        r = _two_ranks(train_args(corpus, tmp_path / name, steps=2, extra=[f"train.init_from={src}", "parallel.ep=2",
                                                                          "train.save_interval=100"]))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        got[name] = step_losses(tmp_path / name)
    for s in got["from_final"]:
        assert got["from_ck"][s] == pytest.approx(got["from_final"][s], rel=1e-6), got


def test_init_from_may_change_training_only_model_fields():
    """Another shape is refused naming the key; a training-only field (the router-bias speed,
    aux-loss weights) may differ: a post-training stage may freeze the bias (as DeepSeek-V3 did)."""
    import dataclasses

    from megads.config import load_model_preset
    from megads.errors import CheckpointError
    from megads.train.init import check_same_shapes

    ckpt = load_model_preset("tiny")
    check_same_shapes(dataclasses.replace(ckpt, bias_update_speed=0.0, seq_aux_alpha=0.0, mtp_lambda=0.1), ckpt, "d")
    with pytest.raises(CheckpointError, match=r"model.hidden_size 256 \(checkpoint\) vs 128"):
        check_same_shapes(dataclasses.replace(ckpt, hidden_size=128), ckpt, "d")
