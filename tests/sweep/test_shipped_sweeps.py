"""The paper-claim sweeps shipped in configs/sweeps/ stay valid: every point's config builds, each
claim has at least 3 seeds per arm and names its baseline, and the MTP sweep's equal-FLOPs budget
gives the MTP arm fewer steps (model-info's FLOPs, the MTP module included)."""
from __future__ import annotations

from pathlib import Path

import pytest

from megads.config import load_config
from megads.model.info import flops_per_token, mtp_flops_per_token
from megads.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "configs" / "sweeps"
CLAIMS = [SWEEPS / f"{name}.yaml" for name in ("mla-vs-mha", "aux-vs-bias", "mtp")]


def test_the_three_claims_are_shipped():
    assert all(p.is_file() for p in CLAIMS)
    load_config(SWEEPS / "claims-base.yaml")


@pytest.mark.parametrize("name", ["scaling-tiny", "layouts-tiny"])
def test_example_sweeps_are_valid(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    sw = load_sweep(f"configs/sweeps/{name}.yaml")
    assert sw.points
    if name == "layouts-tiny":
        assert {p.nproc for p in sw.points} == {1, 2}


@pytest.mark.parametrize("path", CLAIMS, ids=lambda p: p.stem)
def test_claim_sweep_is_valid_with_three_seeds_per_arm(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sw = load_sweep(str(path.relative_to(ROOT)))
    arms = {}
    for p in sw.points:
        arms.setdefault(p.group, set()).add(p.seed)
    assert len(arms) >= 2 and all(len(seeds) >= 3 for seeds in arms.values()), arms
    assert all(p.nproc == 1 for p in sw.points)  # one run at a time on the 2-core machine
    assert sw.table.get("baseline")


def test_mtp_arms_spend_equal_training_flops(monkeypatch):
    monkeypatch.chdir(ROOT)
    sw = load_sweep("configs/sweeps/mtp.yaml")
    spent = {}
    for p in sw.points:
        cfg = load_config(sw.base, p.overrides)
        per_step = cfg.train.global_batch_size * cfg.train.seq_len
        flops = (flops_per_token(cfg.model, cfg.train.seq_len) + mtp_flops_per_token(cfg.model, cfg.train.seq_len))
        spent[cfg.model.mtp_depth] = (cfg.train.max_steps, cfg.train.max_steps * per_step * flops)
    (steps0, c0), (steps1, c1) = spent[0], spent[1]
    assert steps1 < steps0 and c1 == pytest.approx(c0, rel=0.01)  # equal compute within one step's rounding
