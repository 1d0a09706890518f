"""`megads recipe`: every stage of the R1 pipeline runs end to end on a very small model (a few
steps each), writes summary.json / the table / the plots, and a rerun skips finished stages."""
import json

import pytest
import yaml

from conftest import run_megads

MODEL = {"preset": "tiny", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
         "num_layers": 2, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
         "max_seq_len": 256}
SFT = {"max_steps": 3, "micro_batch_size": 4, "global_batch_size": 4, "seq_len": 128, "lr": 1e-3,
       "warmup_steps": 1, "save_interval": 3, "eval_interval": 1000}
GRPO = {"train": {"max_steps": 2, "micro_batch_size": 4, "global_batch_size": 8, "seq_len": 224, "lr": 1e-4,
                  "warmup_steps": 0, "save_interval": 2, "eval_interval": 2},
        "grpo": {"group_size": 4, "max_new_tokens": 12, "rewards": {"accuracy": 1.0, "format": 0.5}}}
GRPO_KL = {"train": GRPO["train"], "grpo": dict(GRPO["grpo"], beta=0.1, rewards={"accuracy": 1.0, "language": 0.2})}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    pre = {"train": dict(SFT, max_steps=4, eval_interval=4, save_interval=4)}
    cfg = {"recipe": {"output_dir": str(d / "out"), "n_train": 200, "n_test": 8, "cold_start_examples": 16,
                      "vocab_size": 320, "eval_prompts": 8, "eval_max_new_tokens": 12, "corpus_passes": 4},
           "model": MODEL, "student": dict(MODEL, num_layers=1),
           "stages": {"pretrain": pre, "student_base": pre, "cold_start": {"train": SFT}, "r1_zero": GRPO,
                      "r1_grpo": GRPO_KL, "student_grpo": GRPO,
                      "rejection": {"rejection": {"num_samples": 2, "keep": 1, "max_prompts": 6,
                                                  "prompts_per_batch": 6, "require": {"format": 0.0},
                                                  "temperature": 1.0}},
                      "r1_sft": {"train": SFT}, "student_distill": {"train": SFT}}}
    path = d / "r1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = run_megads("recipe", str(path), "--set", "recipe.stages=[data,pretrain,cold_start]", timeout=900)
    second = run_megads("recipe", str(path), timeout=1800)
    return d / "out", first, second, path


def test_recipe_runs_every_stage_and_writes_the_summary(recipe):
    out, first, second, _ = recipe
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[pretrain] done before" in second.stdout and "[cold_start] done before" in second.stdout
    summary = json.loads((out / "summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names == ["pretrain", "r1_zero", "cold_start", "r1_grpo", "control", "r1_sft", "student_base",
                     "student_distill", "student_grpo"]
    for s in summary["stages"]:
        assert set(s) == {"name", "heldout_accuracy", "format_rate", "steps", "seconds"}
        assert 0.0 <= s["heldout_accuracy"] <= 1.0 and 0.0 <= s["format_rate"] <= 1.0 and s["seconds"] > 0
    rej = summary["rejection"]
    assert rej["prompts"] == 6 and rej["samples"] == 12 and 0 <= rej["kept"] <= 6
    assert (out / "heldout.png").stat().st_size > 0 and (out / "grpo_steps.png").stat().st_size > 0
    assert "| stage | held-out accuracy |" in (out / "recipe.log").read_text()
    # each GRPO stage logged its per-step metrics; the control's rewards were shuffled
    recs = [json.loads(x) for x in (out / "control" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/total" in r and "grpo/kl" in r for r in recs)
    assert yaml.safe_load((out / "control" / "config.yaml").read_text())["grpo"]["shuffle_rewards"] is True
    assert yaml.safe_load((out / "r1_zero" / "config.yaml").read_text())["grpo"]["template"] == "r1-zero"
    assert yaml.safe_load((out / "r1_grpo" / "config.yaml").read_text())["grpo"]["template"] == "chat"


def test_recipe_rerun_skips_everything(recipe):
    out, _, _, path = recipe
    again = run_megads("recipe", str(path), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done before") == 11


@pytest.mark.parametrize("sets,needle", [
    (["recipe.bogus=1"], "recipe overrides are recipe.KEY=VALUE"),
    (["recipe.stages=[data,nope]"], "unknown stage 'nope'"),
])
def test_recipe_errors_are_one_line_exit_2(tmp_path, sets, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"recipe": {"output_dir": str(tmp_path / "o")}}))
    r = run_megads("recipe", str(path), *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_recipe_unknown_section_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("recipe:\n  outptu_dir: x\n")
    r = run_megads("recipe", str(path))
    assert r.returncode == 2 and "recipe.outptu_dir: unknown key" in r.stderr
