"""The GRPO stage: rollouts (sampler log-probs equal the trainer's recomputation before any
update; completions independent of the batch they are sampled in; stop strings), `megads train`
with train.stage grpo (metrics, held-out eval, a resume in the middle of mu updates equal to the
uninterrupted run), `megads rejection-sample`, and the config errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL, run_megads

from megads.config import load_config
from megads.data.tokenizer import load_tokenizer
from megads.model import Transformer
from megads.rl.rejection import judge
from megads.rl.rollout import StopStrings, row_generators, sample_groups
from megads.rl.tasks import arith, load_tasks, render_prompt


@pytest.fixture(scope="module")
def setup(arith_tok):
    tok = load_tokenizer(arith_tok)
    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    recs = arith(16, 4, seed=1)
    prompts = [render_prompt(tok, r["prompt"], "none") for r in recs[:4]]
    return tok, cfg, model, recs, prompts


def test_sampler_logprobs_equal_trainer_recomputation(setup):
    """The objective's own batch building and log-prob forward, before any update."""
    from megads.train.objectives.grpo import GRPOObjective

    tok, cfg, model, _, prompts = setup
    gens = row_generators(3, 0, [(p, g) for p in range(4) for g in range(4)])
    ro = sample_groups(model, tok, prompts, 4, max_new_tokens=12, temperature=0.9, generators=gens, sync=False)
    assert ro.completion_mask.any()
    obj = GRPOObjective(load_config(None, SMALL + ["grpo.temperature=0.9"]), tok)

    class Loop:
        device = torch.device("cpu")
    cfg2 = obj.cfg
    cfg2.train.micro_batch_size = 16
    batches = obj._micro_batches(Loop(), ro, torch.zeros(16), torch.ones(16, dtype=torch.bool))
    with torch.no_grad():
        lp = obj._logps(model, batches[0])
    m = ro.completion_mask
    assert torch.isfinite(lp[m]).all()
    assert (lp - ro.logps)[m].abs().max() < 1e-4
    # and the sampler's numbers are log-probs of the tempered distribution (not of T = 1)
    with torch.no_grad():
        lp1 = -model(batches[0]["tokens"], batches[0]["labels"], positions=batches[0]["positions"],
                     attention_mask=batches[0]["attention_mask"], token_losses=True).token_losses[:, ro.prompt_len - 1:]
    assert (lp1 - ro.logps)[m].abs().max() > 1e-3


def test_completions_do_not_depend_on_the_batch(setup):
    tok, _, model, _, prompts = setup
    keys = [(p, g) for p in range(4) for g in range(4)]
    whole = sample_groups(model, tok, prompts, 4, max_new_tokens=10, temperature=1.0,
                          generators=row_generators(5, 2, keys), sync=False)
    half = sample_groups(model, tok, prompts[2:], 4, max_new_tokens=10, temperature=1.0,
                         generators=row_generators(5, 2, keys[8:]), sync=False)
    assert whole.texts[8:] == half.texts
    again = sample_groups(model, tok, prompts, 4, max_new_tokens=10, temperature=1.0,
                          generators=row_generators(6, 2, keys), sync=False)
    assert again.texts != whole.texts  # another seed: other samples


def test_stop_strings_end_a_row_and_are_kept(setup):
    tok, _, model, _, prompts = setup
    stop = "1"
    keys = [(p, g) for p in range(4) for g in range(4)]
    ro = sample_groups(model, tok, prompts, 4, max_new_tokens=24, temperature=1.0, stops=[stop],
                       generators=row_generators(1, 0, keys), sync=False)
    ended = [t for t, tr in zip(ro.texts, ro.truncated.tolist()) if not tr]
    assert ended, "no row produced the stop string"
    for text, n in zip(ro.texts, ro.completion_mask.sum(-1).tolist()):
        if stop in text:
            assert text.endswith(stop) and text.count(stop) == 1  # cut right after it
    s = StopStrings(tok, ["</answer>"], 320)
    ids = torch.tensor([tok.encode("x </answer>")])
    assert s(ids, torch.zeros(1, dtype=torch.bool)).tolist() == [True]


def test_judge_keeps_verified_distinct_up_to_k():
    per = {"accuracy": np.array([1, 1, 0, 1, 1, np.nan]), "format": np.array([1, 1, 1, 0, 1, 1])}
    kept, drops, passing = judge(["a", "a ", "b", "c", "d", "e"], per, {"accuracy": 1.0, "format": 1.0}, keep=1)
    assert kept == [0] and passing == 3
    assert drops["duplicate"] == 1 and drops["over_keep"] == 1 and drops["not_verified"] == 1
    assert drops["bad_format"] == 1 and drops["cannot_judge"] == 1


def _grpo_args(tok, out, steps, extra=()):
    sets = [*SMALL, "train.stage=grpo", f"data.tokenizer={tok}", "data.builtin_corpus=false", "grpo.tasks=arith",
            "grpo.group_size=4", "grpo.max_new_tokens=16", "grpo.iterations=2", "grpo.template=none",
            "grpo.rewards={accuracy: 1.0, format: 0.5, language: 0.1}", "grpo.eval_prompts=8",
            f"train.max_steps={steps}", "train.seq_len=48", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.lr=0.003", "train.min_lr=0.003", "train.warmup_steps=0", "train.save_interval=1", "train.eval_interval=2",
            "train.progress=false", "train.samples_at_end=0", f"train.output_dir={out}", "parallel.zero_stage=0",
            *extra]
    return ["train", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def _records(out):
    return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_run(arith_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    r = run_megads(*_grpo_args(arith_tok, out, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_grpo_train_logs_rewards_and_evaluates(grpo_run):
    recs = _records(grpo_run)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    fresh = [r for r in steps if "reward/total" in r]
    assert [r["step"] for r in fresh] == [1, 3]  # mu = 2: a rollout every other step
    for r in fresh:
        for k in ("reward/accuracy", "reward/format", "reward/language", "rollout/zero_std_groups",
                  "rollout/length_mean", "rollout/length_max", "rollout/truncated", "rollout/entropy",
                  "rollout/tokens_per_s", "time/generate_s", "time/reward_s", "time/logprob_s", "time/update_s",
                  "grpo/clip_low", "grpo/clip_high", "grpo/kl", "grpo/ratio"):
            assert k in r, k
        assert r["rollout/logp_max_diff"] < 1e-4  # the sampler's log-probs = the trainer's, before the update
        assert r["grpo/ratio"] == pytest.approx(1.0, abs=1e-6)  # first of the mu steps: the sampling policy
        assert 0 < r["rollout/length_mean"] <= 16 and r["rollout/entropy"] > 0
    second = [r for r in steps if r["step"] in (2, 4)]
    assert any(abs(r["grpo/ratio"] - 1.0) > 1e-6 for r in second)  # the policy moved between the mu steps
    evals = [r for r in recs if "valid_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["valid_format"] <= 1 for r in evals)


def test_grpo_resume_inside_mu_steps_equals_uninterrupted(arith_tok, grpo_run, tmp_path):
    """Stop after step 3 (the first of cycle 2's two updates; constant lr, so the shorter run has the
    same schedule), resume: step 4 trains on the saved
    rollout buffer and gives the uninterrupted run's loss."""
    r = run_megads(*_grpo_args(arith_tok, tmp_path, 3))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_megads(*_grpo_args(arith_tok, tmp_path, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    want = {x["step"]: x["loss"] for x in _records(grpo_run) if "loss" in x}
    got = {x["step"]: x["loss"] for x in _records(tmp_path) if "loss" in x}
    assert got[4] == pytest.approx(want[4], rel=1e-6, abs=1e-9)
    assert got[3] == pytest.approx(want[3], rel=1e-6, abs=1e-9)


def test_grpo_with_the_fixed_shape_decode_step_equals_the_plain_step(arith_tok, grpo_run, tmp_path):
    """grpo.rollout_decode=static (rollouts and held-out sampling through megads.model.static):
    the same completions, rewards and losses as the default (eager on CPU)."""
    r = run_megads(*_grpo_args(arith_tok, tmp_path, 2, ["grpo.rollout_decode=static"]))
    assert r.returncode == 0, r.stderr[-3000:]
    want = {x["step"]: x for x in _records(grpo_run) if "loss" in x}
    got = {x["step"]: x for x in _records(tmp_path) if "loss" in x}
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-7)
    for k in ("reward/total", "rollout/length_mean", "rollout/truncated"):
        assert got[1][k] == want[1][k], k
    evals = [x for x in _records(tmp_path) if "valid_accuracy" in x]
    assert evals and evals[0]["valid_format"] == [x for x in _records(grpo_run) if "valid_accuracy" in x][0]["valid_format"]


def test_grpo_prompts_packed_equal_rows_one_by_one(arith_tok, grpo_run, tmp_path):
    """The default run computes each prompt once in the log-prob forward (grpo.share_prompts: the
    micro-batch's 4 rows of a prompt packed into one row, megads.rl.pack); with
    grpo.share_prompts=false every row runs whole: the same losses, rewards and ratios."""
    want = {x["step"]: x for x in _records(grpo_run) if "loss" in x}
    assert want[1]["rollout/packed_rows"] == 1.0 and want[3]["rollout/packed_rows"] == 1.0
    r = run_megads(*_grpo_args(arith_tok, tmp_path, 2, ["grpo.share_prompts=false"]))
    assert r.returncode == 0, r.stderr[-3000:]
    got = {x["step"]: x for x in _records(tmp_path) if "loss" in x}
    assert got[1]["rollout/packed_rows"] == 0.0
    for step in (1, 2):
        for k in ("loss", "balance_loss", "grpo/ratio", "grad_norm"):
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-5, abs=1e-7), (step, k)
    assert got[1]["reward/total"] == want[1]["reward/total"]


def test_rejection_sample_writes_chat_jsonl_and_stats(arith_tok, grpo_run, tmp_path):
    out = tmp_path / "traces.jsonl"
    sets = [f"rejection.checkpoint={grpo_run / 'final'}", "rejection.tasks=arith", "rejection.max_prompts=6",
            "rejection.num_samples=4", "rejection.keep=2", f"rejection.output={out}", "rejection.require={format: 0.0}",
            f"data.tokenizer={arith_tok}", "grpo.template=none", "grpo.max_new_tokens=12"]
    args = ["rejection-sample", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    r = run_megads(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["prompts"] == 6 and stats["samples"] == 24 and stats["kept"] == len(lines)
    assert sum(stats["pass_histogram"].values()) == 6
    assert stats["kept"] + sum(stats["dropped"].values()) == 24  # every sample kept or dropped for a reason
    assert 0 < len(lines) <= 12
    for x in lines:
        assert [m["role"] for m in x["messages"]] == ["user", "assistant"]
    # the SFT stage reads it as chat data
    from megads.data.sft import render_record

    tok = load_tokenizer(arith_tok)
    ids, mask = render_record(tok, lines[0])
    assert any(mask)
    # an existing output is kept without --force (exit 2, unchanged)
    before = out.read_bytes()
    r = run_megads(*args)
    assert r.returncode == 2 and "exists" in r.stderr and out.read_bytes() == before


@pytest.mark.parametrize("bad, key", [(["grpo.temperature=0"], "grpo.temperature"),
                                      (["train.global_batch_size=6"], "train.global_batch_size"),
                                      (["grpo.aggregation=mean"], "grpo.aggregation"),
                                      (["grpo.rewards={nosuch: 1.0}"], "nosuch"),
                                      (["grpo.rollout_decode=fast"], "grpo.rollout_decode")])
def test_grpo_config_errors_are_one_line(arith_tok, tmp_path, bad, key):
    r = run_megads(*_grpo_args(arith_tok, tmp_path, 2, bad))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert key in lines[-1]


def test_task_jsonl_errors_name_the_line(tmp_path):
    from megads.errors import DataError

    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2"):
        load_tasks(str(p))
    p.write_text('{"prompt": "a", "answer": 1, "split": "dev"}\n')
    with pytest.raises(DataError, match="split"):
        load_tasks(str(p))
    assert load_tasks("arith", n_train=5, n_test=2)[-1]["split"] == "test"


def test_shipped_grpo_config_runs(arith_tok, tmp_path):
    """configs/grpo/tiny.yaml as shipped (R1-Zero template, accuracy + format), on a small model."""
    sets = [*[s for s in SMALL if not s.startswith("model.max_seq_len")], "model.max_seq_len=256",
            f"data.tokenizer={arith_tok}", "data.builtin_corpus=false", "grpo.max_new_tokens=8", "grpo.eval_prompts=4",
            "grpo.group_size=4", "grpo.beta=0.1", "train.max_steps=1", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.seq_len=224", "train.progress=false", f"train.output_dir={tmp_path}",
            "train.eval_interval=1"]
    r = run_megads("train", "configs/grpo/tiny.yaml", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(tmp_path)
    step = next(x for x in recs if "loss" in x)
    assert step["rollout/logp_max_diff"] < 1e-4 and step["grpo/kl"] == pytest.approx(0.0, abs=1e-9)  # ref = policy
    assert any("valid_accuracy" in x for x in recs) and (tmp_path / "final").is_dir()
