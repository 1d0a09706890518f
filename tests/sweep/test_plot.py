"""`megads plot RUN_DIR… [--out FILE.png]` draws a PNG report from real runs (the sweep fixture's
points): one run, several runs on one figure, an expert-load heatmap row for the MoE layer; a dir
without metrics is one line, exit 2, nothing written."""
from __future__ import annotations

import json

import matplotlib.image as mpimg

from megads.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_one_run(sweep_run, capsys):
    run = sweep_run["third"]  # the interrupted and resumed point: its steps were logged twice
    assert any('"expert_load"' in x for x in (run / "metrics.jsonl").read_text().splitlines())
    assert main(["plot", str(run)]) == 0
    out = run / "report.png"
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in capsys.readouterr().out
    h, w = mpimg.imread(out).shape[:2]
    assert w == 1500 and h == 1000  # 15 x 7 in of panels + one 3 in row of heatmaps (one MoE layer), at 100 dpi


def test_plot_several_runs_on_one_figure(sweep_run, tmp_path):
    points = sorted((sweep_run["out"] / "points").iterdir())
    out = tmp_path / "deep" / "compare.png"
    assert main(["plot", *map(str, points), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    h, _ = mpimg.imread(out).shape[:2]
    assert h == 700 + 300 * 2  # four runs x one MoE layer: 4 heatmaps, two rows of three


def test_plot_refuses_a_dir_without_metrics(sweep_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    code = main(["plot", str(sweep_run["third"]), str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no metrics.jsonl" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["plot", str(sweep_run["third"]), "--out", str(tmp_path / "x.jpg")]) == 2
    assert not (tmp_path / "x.jpg").exists()


def test_metrics_records_feed_the_report(sweep_run):
    """The per-layer loads the heatmaps show: [MoE layers][experts] token counts at each evaluation."""
    recs = [json.loads(x) for x in (sweep_run["third"] / "metrics.jsonl").read_text().splitlines()]
    loads = [r["expert_load"] for r in recs if "expert_load" in r]
    assert loads and all(len(x) == 1 and len(x[0]) == 8 for x in loads)  # 1 MoE layer, 8 experts
    # every token picks num_experts_per_tok = 2 experts: each record counts 2 x the step's tokens
    assert all(sum(x[0]) == 2 * 4 * 32 for x in loads)
