"""Scaling-law fits of a sweep's results (scipy does the optimising).

- Loss vs compute: L(C) = a * C^(-alpha) + L_inf over the points' training FLOPs C and final
  valid losses (the seeds of a point averaged), by `scipy.optimize.curve_fit` on C scaled by its
  geometric mean (a well-conditioned problem), weighted by the seeds' spread where there is one.
  Its uncertainty comes from the seeds twice over: the covariance of the weighted fit, and the
  spread of the same fit made on each seed's points alone.
- Compute-optimal size (Chinchilla approach 3, Hoffmann et al. 2022): L(N, D) = E + A N^-alpha +
  B D^-beta over parameters N and tokens D, fitted as they did: log-space residuals under a
  Huber loss (delta 1e-3), started from the best of a grid of (alpha, beta), where the model is
  linear in (E, A, B) and non-negative least squares gives the rest. With C ~ 6 N D it gives
  N_opt(C) = G (C/6)^a and D_opt(C) = G^-1 (C/6)^b, a = beta/(alpha+beta), b = alpha/(alpha+beta),
  G = (alpha A / (beta B))^(1/(alpha+beta)). It needs at least two sizes and two token budgets.
"""
from __future__ import annotations

import math

import numpy as np


def power_law(C, a, alpha, l_inf):
    """L(C) = a * C^(-alpha) + L_inf."""
    return a * np.power(C, -alpha) + l_inf


def fit_loss_vs_compute(C, L, sigma=None) -> dict:
    """Fit L(C) = a C^-alpha + L_inf. Returns {"ok", "a", "alpha", "l_inf", "stderr", "r2", "n"} or
    {"ok": False, "reason"}. sigma: per-point standard deviations (the seeds' spread) or None."""
    from scipy.optimize import curve_fit

    C, L = np.asarray(C, dtype=np.float64), np.asarray(L, dtype=np.float64)
    good = np.isfinite(C) & np.isfinite(L) & (C > 0)
    C, L = C[good], L[good]
    sig = None
    if sigma is not None:
        sig = np.asarray(sigma, dtype=np.float64)[good]
        if not np.all(np.isfinite(sig) & (sig > 0)):
            sig = None  # one seed somewhere: an unweighted fit
    if len(np.unique(C)) < 3:
        return {"ok": False, "reason": f"needs points at 3 or more compute budgets, got {len(np.unique(C))}"}
    c0 = float(np.exp(np.mean(np.log(C))))
    x = C / c0
    best = None
    hi_inf = float(L.min()) * (1 - 1e-9)
    for alpha0 in (0.05, 0.2, 0.5, 1.0):
        for frac in (0.0, 0.5, 0.9):
            l0 = frac * hi_inf
            a0 = max(float(np.mean(L)) - l0, 1e-6)
            try:
                popt, pcov = curve_fit(power_law, x, L, p0=(a0, alpha0, l0), sigma=sig, absolute_sigma=sig is not None,
                                       bounds=([1e-12, 1e-6, 0.0], [np.inf, 10.0, hi_inf]), maxfev=20000)
            except (RuntimeError, ValueError):
                continue
            res = (power_law(x, *popt) - L) / (sig if sig is not None else 1.0)
            cost = float(res @ res)
            if best is None or cost < best[0]:
                best = (cost, popt, pcov)
    if best is None:
        return {"ok": False, "reason": "curve_fit did not converge"}
    _, (a0, alpha, l_inf), pcov = best
    a = a0 * c0 ** alpha  # a0 (C/c0)^-alpha = (a0 c0^alpha) C^-alpha
    err = np.sqrt(np.clip(np.diag(pcov), 0, None)) if np.all(np.isfinite(pcov)) else np.full(3, np.nan)
    # delta method for a = a0 c0^alpha
    a_err = math.sqrt((c0 ** alpha * err[0]) ** 2 + (a * math.log(c0) * err[1]) ** 2) if np.all(np.isfinite(err)) else float("nan")
    pred = power_law(C, a, alpha, l_inf)
    ss_res = float(((pred - L) ** 2).sum())
    ss_tot = float(((L - L.mean()) ** 2).sum())
    return {"ok": True, "law": "L(C) = a * C^-alpha + L_inf", "a": float(a), "alpha": float(alpha),
            "l_inf": float(l_inf), "stderr": {"a": a_err, "alpha": float(err[1]), "l_inf": float(err[2])},
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "n": int(len(C)),
            "weighted_by_seed_std": sig is not None,
            # L_inf pinned at 0 or at the lowest loss: the points do not determine it (nor a, alpha well)
            "l_inf_at_bound": bool(l_inf >= hi_inf * (1 - 1e-6) or l_inf <= 1e-6 * hi_inf)}


def chinchilla(N, D, E, A, alpha, B, beta):
    """L(N, D) = E + A N^-alpha + B D^-beta."""
    return E + A * np.power(N, -alpha) + B * np.power(D, -beta)


def fit_chinchilla(N, D, L) -> dict:
    """Chinchilla approach 3: E, A, alpha, B, beta and the compute-optimal allocation."""
    from scipy.optimize import least_squares, nnls

    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    good = np.isfinite(N) & np.isfinite(D) & np.isfinite(L) & (N > 0) & (D > 0) & (L > 0)
    N, D, L = N[good], D[good], L[good]
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2 or len(L) < 6:
        return {"ok": False, "reason": f"needs >= 2 model sizes, >= 2 token budgets and >= 6 points, got "
                                       f"{len(np.unique(N))} sizes, {len(np.unique(D))} budgets, {len(L)} points"}
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    start, start_cost = None, np.inf
    for alpha in np.linspace(0.05, 1.5, 30):
        for beta in np.linspace(0.05, 1.5, 30):
            X = np.stack([np.ones_like(L), N ** -alpha, D ** -beta], 1)
            coef, _ = nnls(X, L)
            cost = float(((X @ coef - L) ** 2).sum())
            if cost < start_cost:
                start_cost, start = cost, (coef, alpha, beta)
    (E0, A0, B0), alpha0, beta0 = start

    def residual(th):
        e, a, al, b, be = th
        terms = np.stack([np.full_like(logN, e), a - al * logN, b - be * logD])
        return np.logaddexp.reduce(terms, axis=0) - logL

    th0 = [math.log(max(E0, 1e-3)), math.log(max(A0, 1e-3)), alpha0, math.log(max(B0, 1e-3)), beta0]
    sol = least_squares(residual, th0, loss="huber", f_scale=1e-3, method="trf",
                        bounds=([-10, -10, 1e-3, -10, 1e-3], [10, 60, 3.0, 60, 3.0]), max_nfev=20000)
    e, a, alpha, b, beta = sol.x
    E, A, B = math.exp(e), math.exp(a), math.exp(b)
    return {"ok": True, "law": "L(N, D) = E + A N^-alpha + B D^-beta", "E": E, "A": A, "alpha": float(alpha),
            "B": B, "beta": float(beta), **optimal_exponents(A, alpha, B, beta), "n": int(len(L)),
            "rms_log_residual": float(np.sqrt(np.mean(residual(sol.x) ** 2)))}


def optimal_exponents(A, alpha, B, beta) -> dict:
    """a, b and G of the compute-optimal allocation N_opt = G (C/6)^a, D_opt = (C/6)^b / G."""
    return {"a": float(beta / (alpha + beta)), "b": float(alpha / (alpha + beta)),
            "G": float((alpha * A / (beta * B)) ** (1.0 / (alpha + beta)))}


def compute_optimal(fit: dict, C: float) -> dict:
    """N_opt and D_opt at compute C (FLOPs) from a Chinchilla fit."""
    n = fit["G"] * (C / 6.0) ** fit["a"]
    return {"flops": float(C), "params": float(n), "tokens": float(C / (6.0 * n)),
            "loss": float(chinchilla(n, C / (6.0 * n), fit["E"], fit["A"], fit["alpha"], fit["B"], fit["beta"]))}


def group_means(rows: list[dict], key: str) -> list[dict]:
    """Per group: the mean and sample std over its seeds of `key`, with the group's other figures."""
    groups: dict = {}
    for r in rows:
        v = r.get(key)
        if r.get("status") == "done" and v is not None and math.isfinite(v):
            groups.setdefault(r["group"], []).append(r)
    out = []
    for g, rs in groups.items():
        vals = np.array([r[key] for r in rs])
        out.append({**rs[0], "group": g, key: float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                    "n_seeds": len(rs), "seeds": [r.get("seed") for r in rs]})
    return out


def fit_sweep(rows: list[dict], fit_cfg: dict | None = None) -> dict:
    """fit.json: loss vs compute (on the seed means, weighted by their spread, and per seed) and,
    where the grid has sizes x budgets, the Chinchilla fit with per-seed spread."""
    fit_cfg = fit_cfg or {}
    params_key = {"active": "active_params", "total": "total_params",
                  "non_embedding": "non_embedding_params"}.get(str(fit_cfg.get("params", "active")), "active_params")
    key = "final_valid_loss"
    means = group_means(rows, key)
    done = [r for r in rows if r.get("status") == "done" and math.isfinite(r.get(key, float("nan")))]
    seeds = sorted({r.get("seed") for r in done if r.get("seed") is not None})
    out = {"points": len(done), "groups": len(means), "seeds": seeds, "loss": key, "params": params_key}
    front = frontier(means, key)
    use = front if len(front) >= 3 else means
    sigma = [m["std"] for m in use] if use and all(m["n_seeds"] > 1 for m in use) else None
    lc = fit_loss_vs_compute([m["flops"] for m in use], [m[key] for m in use], sigma)
    lc["points"] = "compute frontier" if use is front and len(front) < len(means) else "all"
    lc["groups"] = [m["group"] for m in use]
    names = set(lc["groups"])
    lc["per_seed"] = _per_seed([r for r in done if r["group"] in names], seeds,
                               lambda rs: fit_loss_vs_compute([r["flops"] for r in rs], [r[key] for r in rs]),
                               ("a", "alpha", "l_inf"))
    out["loss_vs_compute"] = lc
    ch = fit_chinchilla([m[params_key] for m in means], [m["tokens"] for m in means], [m[key] for m in means])
    if ch["ok"]:
        cmax = max(m["flops"] for m in means)
        ch["optimal"] = [compute_optimal(ch, c) for c in (cmax, 10 * cmax)]
        ch["per_seed"] = _per_seed(done, seeds, lambda rs: fit_chinchilla([r[params_key] for r in rs],
                                                                          [r["tokens"] for r in rs], [r[key] for r in rs]),
                                   ("alpha", "beta", "E", "a", "b"))
    out["compute_optimal"] = ch
    return out


def frontier(points: list[dict], key: str) -> list[dict]:
    """The compute-efficient points: those no point of less or equal compute beats (the lower
    envelope Kaplan et al. and Hoffmann et al. fit L(C) to; a grid of sizes x budgets puts
    several allocations at each compute, and only the best of them traces the law)."""
    out = []
    for m in sorted(points, key=lambda m: (m["flops"], m[key])):
        if not out or m[key] < out[-1][key]:
            out.append(m)
    return out


def json_safe(x):
    """NaN and infinities as null (JSON has no NaN), recursively."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _per_seed(rows, seeds, fit_fn, keys) -> dict:
    """The fit made on each seed's points alone: values per seed, mean and std of each parameter."""
    fits = {}
    for s in seeds:
        f = fit_fn([r for r in rows if r.get("seed") == s])
        if f.get("ok"):
            fits[s] = f
    res = {"seeds": list(fits)}
    for k in keys:
        vals = [f[k] for f in fits.values()]
        res[k] = {"values": vals, "mean": float(np.mean(vals)) if vals else float("nan"),
                  "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")}
    return res
