"""The sweep fits recover the parameters of synthetic points made from known laws (with noise), say
why they cannot fit when the grid does not allow it, and carry the seeds' spread."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megads.sweep.fit import (chinchilla, compute_optimal, fit_chinchilla, fit_loss_vs_compute, fit_sweep,
                              power_law)

LAW = dict(a=40.0, alpha=0.12, l_inf=1.9)  # L(C) = 40 C^-0.12 + 1.9
CHIN = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al.'s fitted values


def test_loss_vs_compute_recovers_a_known_law():
    rng = np.random.default_rng(0)
    C = np.logspace(12, 17, 9)
    L = power_law(C, **LAW) * (1 + 0.001 * rng.standard_normal(C.size))
    fit = fit_loss_vs_compute(C, L)
    assert fit["ok"]
    assert fit["alpha"] == pytest.approx(LAW["alpha"], rel=0.05)
    assert fit["l_inf"] == pytest.approx(LAW["l_inf"], rel=0.02)
    assert fit["a"] == pytest.approx(LAW["a"], rel=0.25)  # a trades off against alpha over 5 decades
    assert fit["r2"] > 0.999
    # the reported standard errors cover the truth
    assert abs(fit["alpha"] - LAW["alpha"]) < 4 * fit["stderr"]["alpha"]


def test_exact_points_are_fitted_exactly():
    C = np.logspace(10, 14, 6)
    fit = fit_loss_vs_compute(C, power_law(C, **LAW))
    for k in LAW:
        assert fit[k] == pytest.approx(LAW[k], rel=1e-4)


def test_too_few_budgets_is_said_not_fitted():
    fit = fit_loss_vs_compute([1e12, 1e12, 2e12], [3.0, 3.1, 2.9])
    assert not fit["ok"] and "3 or more compute budgets" in fit["reason"]


def test_chinchilla_approach_3_recovers_known_parameters_and_allocation():
    rng = np.random.default_rng(1)
    N, D = np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5))
    N, D = N.ravel(), D.ravel()
    L = chinchilla(N, D, **CHIN) * (1 + 0.001 * rng.standard_normal(N.size))
    fit = fit_chinchilla(N, D, L)
    assert fit["ok"]
    assert fit["alpha"] == pytest.approx(CHIN["alpha"], rel=0.05)
    assert fit["beta"] == pytest.approx(CHIN["beta"], rel=0.05)
    assert fit["E"] == pytest.approx(CHIN["E"], rel=0.02)
    a_true = CHIN["beta"] / (CHIN["alpha"] + CHIN["beta"])
    assert fit["a"] == pytest.approx(a_true, rel=0.03) and fit["a"] + fit["b"] == pytest.approx(1.0)
    # the compute-optimal allocation: C = 6 N D, and no other split of C has a lower predicted loss
    C = 1e21
    opt = compute_optimal(fit, C)
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(C)
    for scale in (0.5, 2.0):
        n = opt["params"] * scale
        other = chinchilla(n, C / (6 * n), fit["E"], fit["A"], fit["alpha"], fit["B"], fit["beta"])
        assert other > opt["loss"]


def test_chinchilla_needs_sizes_and_budgets():
    fit = fit_chinchilla([1e6] * 6, np.logspace(8, 9, 6), np.linspace(3, 2.5, 6))
    assert not fit["ok"] and "2 model sizes" in fit["reason"]


def test_fit_sweep_averages_seeds_and_reports_their_spread():
    """Three seeds of six budgets: the fit is made on the seed means (weighted by their spread)
    and once per seed; the per-seed spread of alpha is reported and is what the noise implies."""
    rng = np.random.default_rng(2)
    rows = []
    for i, C in enumerate(np.logspace(12, 16, 6)):
        for seed in (1, 2, 3):
            rows.append({"group": f"g{i}", "seed": seed, "status": "done", "flops": C, "tokens": C / 6e6,
                         "active_params": 1e6, "final_valid_loss": float(power_law(C, **LAW) * (1 + 0.002 * rng.standard_normal()))})
    fit = fit_sweep(rows)
    lc = fit["loss_vs_compute"]
    assert fit["points"] == 18 and fit["groups"] == 6 and fit["seeds"] == [1, 2, 3]
    assert lc["ok"] and lc["weighted_by_seed_std"]
    assert lc["alpha"] == pytest.approx(LAW["alpha"], rel=0.1)
    per = lc["per_seed"]["alpha"]
    assert len(per["values"]) == 3 and per["std"] > 0 and math.isfinite(per["mean"])
    assert abs(per["mean"] - LAW["alpha"]) < 0.1 * LAW["alpha"]
    assert fit["compute_optimal"]["ok"] is False  # one model size only


def test_loss_vs_compute_is_fitted_on_the_compute_frontier():
    """A grid of sizes x budgets: at each compute several allocations; the law is traced by the
    best of them (the lower envelope), not by the mean of good and bad allocations."""
    rows = []
    for i, C in enumerate(np.logspace(12, 16, 5)):
        best = float(power_law(C, **LAW))
        for j, penalty in enumerate((0.0, 0.3, 0.8)):  # the compute-optimal size and two worse ones
            rows.append({"group": f"c{i}-n{j}", "seed": 1, "status": "done", "flops": C * (1 + 0.01 * j),
                         "tokens": C / 6e6, "active_params": 1e6 * (j + 1), "final_valid_loss": best + penalty})
    lc = fit_sweep(rows)["loss_vs_compute"]
    assert lc["ok"] and lc["points"] == "compute frontier" and lc["groups"] == [f"c{i}-n0" for i in range(5)]
    for k in LAW:
        assert lc[k] == pytest.approx(LAW[k], rel=1e-3)


def test_fit_json_has_no_nan():
    import json

    from megads.sweep.fit import json_safe

    fit = fit_sweep([{"group": "g", "seed": 1, "status": "done", "flops": 1e12, "tokens": 1e6, "active_params": 1e6,
                      "final_valid_loss": 3.0}])
    text = json.dumps(json_safe(fit), allow_nan=False)  # raises on a NaN
    assert "NaN" not in text and json.loads(text)["loss_vs_compute"]["ok"] is False
