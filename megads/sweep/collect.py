"""After the points have run: results.csv, fit.json, summary.md (one row per group of seeds, mean ±
sample std, and the paired difference to a baseline group), and the plots."""
from __future__ import annotations

import json
import math

import numpy as np

from megads.sweep.fit import fit_sweep, json_safe
from megads.sweep.results import point_row, write_csv
from megads.sweep.runner import read_record

# (results column, header, format) of the summary table; rows without a figure show "–"
SUMMARY = [("final_valid_loss", "valid loss", "{:.4f}"), ("final_train_loss", "train loss", "{:.4f}"),
           ("expert_load_max_over_mean", "max/mean expert load", "{:.3f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
           ("wall_s", "wall s", "{:.0f}")]


def collect_sweep(sw, say=print) -> dict:
    """Write results.csv, fit.json, summary.md and the plots of sweep `sw`; return the fit."""
    rows = [point_row(sw, p, read_record(p)) for p in sw.points]
    out = sw.output_dir
    write_csv(rows, out / "results.csv")
    fit = fit_sweep(rows, sw.fit)
    (out / "fit.json").write_text(json.dumps(json_safe(fit), indent=1, default=float, allow_nan=False) + "\n")
    table = summary_table(rows, sw.table.get("baseline"))
    (out / "summary.md").write_text(table + "\n")
    done = sum(r["status"] == "done" for r in rows)
    say(f"{done} of {len(rows)} points done; {out / 'results.csv'}, {out / 'fit.json'}")
    say(table)
    lc = fit["loss_vs_compute"]
    if lc.get("ok"):
        say(f"fit: L(C) = {lc['a']:.4g} * C^-{lc['alpha']:.4f} + {lc['l_inf']:.4f} (r2 {lc['r2']:.3f}, "
            f"{len(lc['groups'])} points: {lc['points']})"
            + ("; L_inf is at a bound of the fit: the points do not pin it down" if lc["l_inf_at_bound"] else ""))
    else:
        say(f"loss-vs-compute fit: {lc.get('reason')}")
    if fit["compute_optimal"].get("ok"):
        co = fit["compute_optimal"]
        say(f"compute-optimal: N ~ C^{co['a']:.3f}, D ~ C^{co['b']:.3f} (Chinchilla approach 3)")
    try:
        from megads.sweep.plots import plot_sweep

        written = plot_sweep(sw, rows, fit)
        say("plots: " + ", ".join(str(p) for p in written))
    except Exception as e:  # plotting must not lose the results
        say(f"plots not written ({type(e).__name__}: {e})")
    return fit


def _fmt(vals: list[float], fmt: str) -> str:
    vals = [v for v in vals if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(float(np.mean(vals)))} ± {fmt.replace('+', '').format(float(np.std(vals, ddof=1)))}"


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _varied(r: dict) -> dict:
    return {k: v for k, v in r.items() if "." in k}


def summary_table(rows: list[dict], baseline: dict | None = None) -> str:
    """Markdown: one row per group of seeds (mean ± sample std over the seeds); with `baseline`
    ({key: value} naming the reference group), the per-seed paired difference of the valid loss."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault(r["group"], []).append(r)
    head = ["group", "seeds", "params total / active", "KV cache B/token", "tokens", "train FLOPs"]
    head += [h for _, h, _ in SUMMARY[:1]] + (["Δ valid vs baseline"] if baseline else []) + [h for _, h, _ in SUMMARY[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        r0 = rs[0]
        cells = [g, str(len(rs)), f"{_human(r0['total_params'])} / {_human(r0['active_params'])}",
                 f"{r0['kv_cache_bytes_per_token']:,}", _human(r0["tokens"]), f"{r0['flops']:.3g}"]
        cells.append(_fmt([r["final_valid_loss"] for r in rs], SUMMARY[0][2]))
        if baseline:
            cells.append(_paired(rs, groups, baseline))
        cells += [_fmt([r.get(k) for r in rs], f) for k, _, f in SUMMARY[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(rs: list[dict], groups: dict, baseline: dict) -> str:
    """valid loss(group, seed) - valid loss(baseline group, seed), mean ± std over shared seeds."""
    if "group" in baseline:  # {group: NAME}: that group is the reference of every other
        ref = groups.get(str(baseline["group"]))
    else:  # {key: value}: the group with this group's other values and the baseline's
        want = {**_varied(rs[0]), **baseline}
        ref = next((g for g in groups.values() if {k: g[0].get(k) for k in want} == want), None)
    if ref is None:
        return "no baseline"
    if ref is rs:
        return "(baseline)"
    by_seed = {r["seed"]: r["final_valid_loss"] for r in ref}
    diffs = [r["final_valid_loss"] - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed]
    return _fmt(diffs, "{:+.4f}")
