"""grpo.rollout_precision: rollouts and held-out sampling in their own dtype. The copy that
samples in another dtype than training's holds the policy's current weights (cast) and its float32
buffers untouched; auto decides by the pin, by the bf16 matmul floor, or by timing the real decode
step of both; a GRPO run sampling in bf16 while training in fp32 trains, with the sampler's
log-probs within bf16 rounding of the trainer's."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL, run_megads

from megads.config import load_config
from megads.model import Transformer
from megads.rl.rollout import RolloutCopy
from megads.runtime import precision


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(load_config(None, SMALL).model)


def test_cast_params_keeps_float32_buffers():
    m = precision.cast_params(_model(), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    bufs = dict(m.named_buffers())
    assert bufs and all(b.dtype == torch.float32 for b in bufs.values())
    # the rope table is the exact float32 one, not rounded to bf16
    ref = _model()
    for name, b in bufs.items():
        assert torch.equal(b, dict(ref.named_buffers())[name]), name


def test_rollout_copy_follows_the_policy():
    policy = _model(0)
    copy = RolloutCopy(policy, precision.cast_params(_model(1), torch.bfloat16))
    with torch.no_grad():  # an optimizer step and a router-bias update on the policy
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in policy.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.linspace(-1.0, 1.0, b.numel()) + 1e-3)
    m = copy.synced()
    for (name, p), q in zip(policy.named_parameters(), m.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), name
    pb, mb = dict(policy.named_buffers()), dict(m.named_buffers())
    assert any(k.endswith("gate.bias") for k in pb)
    for k in pb:  # float32 buffers equal exactly (a bias step of 1e-3 near 1.0 survives)
        assert mb[k].dtype == torch.float32 and torch.equal(mb[k], pb[k]), k
    assert not any(p.requires_grad for p in m.parameters())


def test_choose_decode_branches(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    never = lambda: pytest.fail("timed the decode step")  # noqa: E731
    assert precision.choose_decode("bf16", {}, never) == ("bf16", "configured")
    used, why = precision.choose_decode("auto", {"fp32": 100.0, "bf16": 9.0}, never)
    assert used == "fp32" and "not timed" in why
    for rates in ({"fp32": 10.0, "bf16": 20.0}, {"fp32": 20.0, "bf16": 10.0}):
        used, why = precision.choose_decode("auto", {"fp32": 1.0, "bf16": 0.5}, lambda: rates)
        assert used == max(rates, key=rates.get) and "measured decode step" in why
    monkeypatch.setenv(precision.ENV, "bf16")
    assert precision.choose_decode("auto", {"fp32": 100.0, "bf16": 1.0}, never)[0] == "bf16"


def test_grpo_auto_times_the_real_decode_step(monkeypatch):
    """auto where the bf16 matmul passes the floor: both decode steps are timed at the rollout's
    rows, the faster is used, and a copy exists exactly when it is not the policy's dtype."""
    from megads.train.objectives.grpo import GRPOObjective

    monkeypatch.delenv(precision.ENV, raising=False)

    class Loop:
        model = _model(0)
        peaks = {"fp32": 1.0, "bf16": 0.5}

        @staticmethod
        def _build_model():
            return _model(1)

    obj = GRPOObjective(load_config(None, SMALL))
    rng = np.random.get_state()
    note = obj._setup_sampler(Loop, rows=8)
    assert np.array_equal(np.random.get_state()[1], rng[1])  # the run's numpy stream untouched
    assert "measured decode step" in note
    used = "bf16" if "rollouts in bf16" in note else "fp32"
    assert (obj.sampler is not None) == (used == "bf16")
    model = obj._sampling_model(Loop)
    assert next(model.parameters()).dtype == precision.DTYPES[used]
    if used == "bf16":  # the copy holds the policy's weights, not its own build's
        assert torch.equal(next(model.parameters()), next(Loop.model.parameters()).to(torch.bfloat16))


def test_grpo_samples_in_bf16_while_training_in_fp32(arith_tok, tmp_path):
    from test_grpo_stage import _grpo_args

    r = run_megads(*_grpo_args(arith_tok, tmp_path, 2, ["grpo.rollout_precision=bf16", "grpo.iterations=1"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollouts in bf16 (configured; a copy of the weights in bf16)" in r.stdout + r.stderr
    assert "precision fp32" in r.stdout + r.stderr
    recs = [json.loads(x) for x in Path(tmp_path, "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2]
    for x in steps:  # the trainer's fp32 recomputation vs the bf16 sampler: bf16 rounding, no more
        assert 0 < x["rollout/logp_max_diff"] < 0.1 and np.isfinite(x["loss"])
        assert x["grpo/ratio"] == pytest.approx(1.0, abs=1e-6)  # old log-probs are the trainer's own
