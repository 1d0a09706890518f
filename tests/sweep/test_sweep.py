"""`megads sweep`: a real 4-point sweep interrupted (SIGTERM) during its third point resumes without
redoing the finished points, finishes the interrupted one from its checkpoint, and writes
results.csv (figures recomputed here from the runs), fit.json, summary.md and plots; bad sweep
files are one line, exit 2, nothing created."""
from __future__ import annotations

import csv
import json

import pytest

from megads.cli import main
from megads.config import load_config
from megads.model.info import model_info

from sweep_helpers import TOKENS, megads, metric_steps, sweep_yaml


def test_interrupted_sweep_resumes_without_redoing_points(sweep_run):
    r = sweep_run
    out = r["out"]
    assert r["code1"] == 143, r["first"][-3000:]  # the point saved a checkpoint and exited on SIGTERM
    assert "sweep stopped at tokens-5120_seed-7" in r["first"], r["first"][-2000:]
    assert 2 <= len(r["stopped_at"]) < 40  # stopped part-way
    assert r["code2"] == 0, r["second"][-3000:]
    second = r["second"]
    for name in ("tokens-768_seed-7", "tokens-1152_seed-7"):
        assert f"{name}: done before" in second
        # not retrained: their metrics are byte for byte what the first run wrote
        assert (out / "points" / name / "metrics.jsonl").read_bytes() == r["before"][name]
    assert "tokens-5120_seed-7: resuming" in second
    log = (r["third"] / "train.log").read_text()
    assert "resumed from" in log
    # the resumed point logged every step once more from its checkpoint on, and reached the end
    steps = metric_steps(r["third"])
    assert sorted(set(steps)) == list(range(1, 41))
    assert "tokens-1536_seed-7: training" in second
    rec = json.loads((r["third"] / "sweep_point.json").read_text())
    assert rec["done"] and rec["attempts"] == 2


def test_results_csv_holds_the_runs_figures(sweep_run):
    out = sweep_run["out"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["point"] for row in rows] == [f"tokens-{t}_seed-7" for t in TOKENS]
    for row, tokens in zip(rows, TOKENS):
        assert row["status"] == "done" and row["seed"] == "7" and float(row["sweep.tokens"]) == tokens
        steps = tokens // (4 * 32)
        assert int(row["steps"]) == steps and int(row["tokens"]) == tokens
        point = out / "points" / row["point"]
        cfg = load_config("configs/tiny.yaml", json.loads((point / "sweep_point.json").read_text())["overrides"])
        info = model_info(cfg.model, cfg.train.seq_len)
        assert int(row["total_params"]) == info["total_params"] and int(row["active_params"]) == info["active_params"]
        assert int(row["kv_cache_bytes_per_token"]) == info["kv_cache_bytes_per_token"]
        assert float(row["flops"]) == pytest.approx(tokens * info["flops_per_token"])
        recs = [json.loads(x) for x in (point / "metrics.jsonl").read_text().splitlines()]
        valid = [x["valid_loss"] for x in recs if "valid_loss" in x]
        assert float(row["final_valid_loss"]) == pytest.approx(valid[-1])
        by_step = {x["step"]: x["lm_loss"] for x in recs if "loss" in x}  # a redone step: its last record
        by_load = {x["step"]: x["expert_load_max_over_mean"] for x in recs if "loss" in x}
        tail = [by_step[k] for k in range(steps - max(1, steps // 20) + 1, steps + 1)]  # the last 5% of the steps
        assert float(row["final_train_loss"]) == pytest.approx(sum(tail) / len(tail))
        assert float(row["tokens_per_s"]) > 0 and float(row["wall_s"]) > 0 and float(row["train_s"]) > 0
        quarter = [by_load[k] for k in range(steps - max(1, steps // 4) + 1, steps + 1)]  # the last quarter
        assert float(row["expert_load_max_over_mean"]) == pytest.approx(sum(quarter) / len(quarter))
        assert all(x >= 1.0 for x in quarter)  # the busiest expert carries at least the mean
    fit = json.loads((out / "fit.json").read_text())
    assert fit["points"] == 4 and fit["groups"] == 4 and fit["seeds"] == [7]
    lc = fit["loss_vs_compute"]
    assert lc["ok"] is True or lc["reason"]
    if lc["ok"]:
        assert lc["n"] == 4 and lc["alpha"] > 0
    assert fit["compute_optimal"]["ok"] is False and "model sizes" in fit["compute_optimal"]["reason"]
    assert "| tokens-768 | 1 |" in (out / "summary.md").read_text()
    for png in ("loss_vs_compute.png", "loss_curves.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_only_and_listing(sweep_run, capsys):
    spec = str(sweep_run["spec"])
    assert main(["sweep", spec, "--count"]) == 0 and capsys.readouterr().out.strip() == "4"
    assert main(["sweep", spec, "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("[done]") == 4 and "train.max_steps=40" in listing
    (sweep_run["out"] / "results.csv").unlink()
    assert main(["sweep", spec, "--collect"]) == 0
    assert "4 of 4 points done" in capsys.readouterr().out and (sweep_run["out"] / "results.csv").is_file()


def test_a_point_run_with_other_settings_is_refused(sweep_run, tmp_path, capsys):
    spec = sweep_yaml(sweep_run["corpus"], sweep_run["out"], tmp_path / "changed.yaml")
    spec.write_text(spec.read_text().replace("model.hidden_size: 64", "model.hidden_size: 96"))
    assert main(["sweep", str(spec), "--point", "0"]) == 2
    err = capsys.readouterr().err
    assert "run with other settings" in err and "model.hidden_size=96" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("body, needle", [
    ("sweep:\n  base: configs/tiny.yaml\n  grid:\n    model.num_heads: [4, 0]\n", "point 1 (num_heads-0): --set model.num_heads=0"),
    ("sweep:\n  base: configs/tiny.yaml\n  grid:\n    model.no_such: [1]\n", "model.no_such: unknown key"),
    ("sweep:\n  base: configs/tiny.yaml\n  grdi:\n    train.lr: [0.1]\n", "sweep.grdi: unknown key"),
    ("sweep:\n  base: configs/tiny.yaml\n  grid:\n    train.lr: 0.1\n", "sweep.grid.train.lr: expected a non-empty list"),
    ("sweep:\n  grid:\n    train.lr: [0.1]\n", "sweep.base: required"),
    ("sweep:\n  base: configs/tiny.yaml\n  grid:\n    sweep.tokens: [0]\n", "sweep.tokens: must be a positive number"),
    ("sweep:\n  base: configs/tiny.yaml\n  set: {train.output_dir: x}\n", "train.output_dir: set by the sweep"),
    ("", "empty sweep file"),
])
def test_bad_sweep_files_are_one_line_exit_2(tmp_path, body, needle, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(body.replace("  base:", f"  output_dir: {tmp_path / 'out'}\n  base:"))
    assert main(["sweep", str(spec)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_real_process_reports_a_bad_sweep_in_one_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("sweep:\n  base: configs/tiny.yaml\n  grid:\n    model.attention: [mla, gqa]\n")
    r = megads("sweep", str(spec))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "point 1 (attention-gqa): --set model.attention=gqa: model.attention: must be 'mla' or 'mha'" in r.stderr
