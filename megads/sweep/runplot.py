"""`megads plot RUN_DIR… [--out FILE.png]`: a run (or several, on the same axes) at a glance, from
their metrics.jsonl: train and valid loss, learning rate, gradient norm, tokens/s and the MoE
balance per step, and one expert-load heatmap per MoE layer (experts x time, each column the
load over its mean: 1.0 = balanced) from the expert loads the trainer logs at each evaluation.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from megads.errors import MegadsError
from megads.sweep.plots import _colors, _plt, _smooth, save
from megads.sweep.results import read_run

PANELS = [("loss", "loss (train: line, valid: dots)", False), ("lr", "learning rate", False),
          ("grad_norm", "gradient norm", True), ("tokens_per_s", "tokens/s", False),
          ("expert_load_max_over_mean", "max/mean expert load (worst layer)", False)]


def _labels(dirs: list[Path]) -> list[str]:
    """Each run's dir name, with its parent where two runs share a name."""
    names = [d.resolve().name for d in dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def plot_runs(run_dirs: list[str], out: str | None = None) -> Path:
    """Draw the report of `run_dirs` into `out` (default: RUN_DIR/report.png for one run,
    ./report.png for several); returns the path. MegadsError (nothing written) for a dir without
    metrics."""
    if not run_dirs:
        raise MegadsError("plot: give at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    runs = [read_run(d) for d in dirs]  # every dir checked before anything is drawn
    for d, r in zip(dirs, runs):
        if not r["steps"]:
            raise MegadsError(f"{d}: metrics.jsonl has no training step yet")
    target = Path(out) if out else (dirs[0] / "report.png" if len(dirs) == 1 else Path("report.png"))
    if target.suffix.lower() != ".png":
        raise MegadsError(f"--out {target}: expected a .png file name")
    labels = _labels(dirs)
    plt = _plt()
    heat = [(lab, run["experts"]) for lab, run in zip(labels, runs) if run["experts"]]
    n_layers = [len(recs[-1]["expert_load"]) for _, recs in heat]
    n_heat = sum(n_layers)
    heat_rows = -(-n_heat // 3) if n_heat else 0
    fig = plt.figure(figsize=(15, 7 + 3 * heat_rows))
    grid = fig.add_gridspec(2 + heat_rows, 3)
    color = _colors(labels)
    axes = [fig.add_subplot(grid[i // 3, i % 3]) for i in range(len(PANELS))]
    for lab, run in zip(labels, runs):
        steps = run["steps"]
        x = [r["step"] for r in steps]
        for ax, (key, title, logy) in zip(axes, PANELS):
            ys = [r.get(key, math.nan) for r in steps]
            if all(not isinstance(y, (int, float)) or not math.isfinite(y) for y in ys):
                continue
            ys = [y if isinstance(y, (int, float)) else math.nan for y in ys]
            if key == "loss":
                ax.plot(x, ys, color=color[lab], lw=0.5, alpha=0.3)
                ax.plot(x, _smooth(ys), color=color[lab], lw=1.2, label=lab)
                val = [v for v in run["valid"] if "valid_loss" in v]
                ax.plot([v["step"] for v in val], [v["valid_loss"] for v in val], "o", color=color[lab], ms=4)
            else:
                ax.plot(x, ys, color=color[lab], lw=1, label=lab)
            if logy:
                ax.set_yscale("log")
    for ax, (key, title, _) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged (dense model?)" if key.startswith("expert") else "not logged",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    _summary_text(fig.add_subplot(grid[1, 2]), labels, runs)
    k = 0
    for (lab, recs), nl in zip(heat, n_layers):
        loads = np.array([r["expert_load"] for r in recs if len(r["expert_load"]) == nl], dtype=np.float64)  # [T, L, E]
        steps = [r["step"] for r in recs if len(r["expert_load"]) == nl]
        rel = loads / np.maximum(loads.mean(axis=2, keepdims=True), 1e-9)
        for layer in range(nl):
            ax = fig.add_subplot(grid[2 + k // 3, k % 3])
            im = ax.imshow(rel[:, layer, :].T, aspect="auto", origin="lower", cmap="coolwarm", vmin=0.0, vmax=2.0,
                           interpolation="nearest")
            ticks = list(range(0, len(steps), max(1, -(-len(steps) // 6))))  # at most 6, evenly spaced
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            ax.set_title(f"{lab}: MoE layer {layer} load / mean", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
            k += 1
    fig.suptitle(" vs ".join(labels) if len(labels) > 1 else labels[0])
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    save(fig, target)
    plt.close(fig)
    return target


def _summary_text(ax, labels, runs) -> None:
    """The last panel: each run's final figures as text."""
    ax.axis("off")
    lines = []
    for lab, run in zip(labels, runs):
        last = run["steps"][-1]
        val = [v["valid_loss"] for v in run["valid"] if "valid_loss" in v]
        tps = [r.get("tokens_per_s") for r in run["steps"][len(run["steps"]) // 10:] if r.get("tokens_per_s")]
        lines.append(f"{lab}: step {last['step']}, train loss {last.get('loss', math.nan):.4f}"
                     + (f", valid {val[-1]:.4f}" if val else "")
                     + (f", {np.median(tps):.0f} tokens/s" if tps else ""))
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace", wrap=True)
