"""Trainer options: bf16, a user's own DeepSpeed JSON, activation checkpointing, ZeRO-2."""
import json

import pytest

from conftest import megads, step_losses, train_args


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    r = megads(*train_args(corpus, out, steps=3, extra=["train.samples_at_end=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    return step_losses(out)


def test_activation_checkpointing_gives_the_same_losses(corpus, base, tmp_path):
    r = megads(*train_args(corpus, tmp_path, steps=3, extra=["train.activation_checkpointing=true",
                                                             "train.samples_at_end=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    got = step_losses(tmp_path)
    for s in base:
        assert got[s] == pytest.approx(base[s], rel=1e-6)


def test_bf16_trains(corpus, base, tmp_path):
    r = megads(*train_args(corpus, tmp_path, steps=3, extra=["train.precision=bf16", "train.samples_at_end=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    got = step_losses(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for s in base:  # same run in bf16: close to fp32, not equal
        assert got[s] == pytest.approx(base[s], rel=0.05)


def test_user_deepspeed_json(corpus, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 1,
                              "gradient_accumulation_steps": 4, "gradient_clipping": 0.5,
                              "zero_optimization": {"stage": 2}}))
    r = megads(*train_args(corpus, tmp_path / "run", steps=2, extra=[f"train.deepspeed_config={ds}",
                                                                     "train.samples_at_end=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]


def test_user_deepspeed_json_errors(corpus, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,\n "oops": }')
    r = megads(*train_args(corpus, tmp_path / "r1", steps=2, extra=[f"train.deepspeed_config={bad}"]))
    assert r.returncode == 2 and "bad.json:2" in r.stderr
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"train_batch_size": 5, "train_micro_batch_size_per_gpu": 1,
                                 "gradient_accumulation_steps": 4}))
    r = megads(*train_args(corpus, tmp_path / "r2", steps=2, extra=[f"train.deepspeed_config={wrong}"]))
    assert r.returncode == 2 and "train_batch_size 5" in r.stderr
