"""A sweep's PNG plots (matplotlib, Agg): loss vs compute with the fit, the loss curves of every
point, and tokens/s vs ranks per parallel layout. Each file is written whole (temp + rename)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write a figure atomically: a reader never sees half a PNG, a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _colors(groups: list[str]) -> dict:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "viridis")
    n = max(1, len(groups) - 1)
    return {g: cmap(i if len(groups) <= 10 else i / n) for i, g in enumerate(groups)}


def plot_sweep(sw, rows: list[dict], fit: dict) -> list[Path]:
    """loss_vs_compute.png, loss_curves.png, throughput.png under the sweep's output dir."""
    plt = _plt()
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return []
    groups = list(dict.fromkeys(r["group"] for r in done))
    color = _colors(groups)
    out = sw.output_dir
    written = []

    # loss vs compute, every seed and the seed means, with the fitted law
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        rs = [r for r in done if r["group"] == g and math.isfinite(r["final_valid_loss"])]
        if not rs:
            continue
        c = np.array([r["flops"] for r in rs])
        v = np.array([r["final_valid_loss"] for r in rs])
        ax.scatter(c, v, s=12, alpha=0.35, color=color[g])
        ax.errorbar([c.mean()], [v.mean()], yerr=[v.std(ddof=1) if len(v) > 1 else 0.0], fmt="o", color=color[g],
                    capsize=3, label=g if len(groups) <= 12 else None)
    lc = fit.get("loss_vs_compute", {})
    if lc.get("ok"):
        cs = np.array([r["flops"] for r in done])
        grid = np.logspace(np.log10(cs.min()) - 0.1, np.log10(cs.max()) + 0.3, 100)
        ax.plot(grid, lc["a"] * grid ** -lc["alpha"] + lc["l_inf"], "k--", lw=1,
                label=f"fit: {lc['a']:.3g} C^-{lc['alpha']:.3f} + {lc['l_inf']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final valid loss")
    ax.set_title(f"{sw.name}: loss vs compute")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(save(fig, out / "loss_vs_compute.png"))
    plt.close(fig)

    # loss curves: train (main-token) loss per point against tokens, valid loss as markers
    from megads.sweep.results import read_run

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for p in sw.points:
        r = next((x for x in done if x["point"] == p.name), None)
        if r is None:
            continue
        run = read_run(p.out)
        per_step = r["tokens"] / max(1, r["steps"])
        steps = run["steps"]
        key = "lm_loss" if steps and "lm_loss" in steps[0] else "loss"
        lab = r["group"] if r["group"] not in labelled and len(groups) <= 12 else None
        labelled.add(r["group"])
        ax.plot([s["step"] * per_step for s in steps], _smooth([s.get(key, np.nan) for s in steps]),
                color=color[r["group"]], lw=0.8, alpha=0.8, label=lab)
        val = [v for v in run["valid"] if "valid_loss" in v]
        ax.plot([v["step"] * per_step for v in val], [v["valid_loss"] for v in val], "o", ms=3, color=color[r["group"]])
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (lines: train, smoothed; dots: valid)")
    ax.set_title(f"{sw.name}: loss curves")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(save(fig, out / "loss_curves.png"))
    plt.close(fig)

    # throughput vs ranks, one line per layout
    fig, ax = plt.subplots(figsize=(6, 4))
    for lay in sorted({r["layout"] for r in done}):
        rs = [r for r in done if r["layout"] == lay and math.isfinite(r.get("tokens_per_s", np.nan))]
        ranks = sorted({r["ranks"] for r in rs})
        means = [np.mean([r["tokens_per_s"] for r in rs if r["ranks"] == n]) for n in ranks]
        stds = [np.std([r["tokens_per_s"] for r in rs if r["ranks"] == n]) for n in ranks]
        ax.errorbar(ranks, means, yerr=stds, marker="o", capsize=3, label=lay)
    ax.set_xlabel("ranks")
    ax.set_ylabel("tokens/s (median step)")
    ax.set_title(f"{sw.name}: throughput per layout")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(save(fig, out / "throughput.png"))
    plt.close(fig)
    return written


def _smooth(ys, frac: float = 0.02) -> np.ndarray:
    """A centred moving average over ~2% of the points (train losses are noisy step to step)."""
    y = np.asarray(ys, dtype=np.float64)
    k = max(1, int(len(y) * frac)) | 1
    if k == 1 or len(y) < k:
        return y
    pad = k // 2
    yp = np.pad(y, pad, mode="edge")
    return np.convolve(yp, np.ones(k) / k, mode="valid")
