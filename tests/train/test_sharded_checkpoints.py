"""Sharded (DCP) checkpoints from the command line: a 2-rank ZeRO-1 checkpoint resumed by one
process (a reshard) continues the uninterrupted run; asynchronous saves give the same
checkpoints and losses as synchronous ones; a missing shard is refused naming it; `megads
checkpoint inspect` prints the step, the layout and the tensors; a checkpoint in the older
per-layout format is refused in one line."""
import json
import shutil

import pytest
import torch

from conftest import step_losses, train_args
from test_runs_safe import assert_same_losses, copy_run, reference2, run  # noqa: F401 (fixture)


def test_two_rank_zero1_checkpoint_resumes_in_one_process(corpus, reference2, tmp_path):  # noqa: F811
    out = copy_run(reference2[0], tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "final").rename(tmp_path / "final_was")
    code, text = run(train_args(corpus, out))  # 1 process, ZeRO-0: another layout than the writer's
    assert code == 0, text[-3000:]
    assert "resume: layout.world changed 2 -> 1" in text and "resume: parallel.zero_stage changed 1 -> 0" in text
    got = step_losses(out)
    for s in range(3, 7):
        assert got[s] == pytest.approx(reference2[1][s], rel=1e-5), (s, got, reference2[1])


def test_async_saves_complete_and_resume_like_sync_ones(corpus, reference, tmp_path):
    _, ref, _ = reference
    out = tmp_path / "run"
    code, text = run(train_args(corpus, out, extra=["train.async_save=true"]))
    assert code == 0, text[-3000:]
    assert_same_losses(step_losses(out), ref)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-2", "step-4", "step-6"], steps  # every one completed, no .tmp debris
    code, text = run(["checkpoint", "verify", str(out)])
    assert code == 0 and text.count("OK   ") == 3, text
    # the same tensors as the synchronous run's checkpoint of that step
    from megads.checkpoint.sharded import describe

    a, b = describe(out / "checkpoints" / "step-4"), describe(reference[0] / "checkpoints" / "step-4")
    assert [x for x in a if not x[0].startswith("rank.")] == [x for x in b if not x[0].startswith("rank.")]
    shutil.rmtree(out / "checkpoints" / "step-6")
    (out / "final").rename(tmp_path / "final_was")
    code, text = run(train_args(corpus, out, extra=["train.async_save=true"]))
    assert code == 0 and "checkpoints/step-4 at step 4" in text, text[-3000:]
    assert_same_losses(step_losses(out), ref)


def test_missing_shard_is_refused_naming_it(corpus, reference2, tmp_path):  # noqa: F811
    out = copy_run(reference2[0], tmp_path / "run")
    bad = out / "checkpoints" / "step-6" / "__1_0.distcp"
    bad.unlink()
    code, text = run(train_args(corpus, out, extra=["train.max_steps=7"]))
    assert code == 2, text[-3000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and str(bad) in err[0] and "missing" in err[0], err
    assert f"--resume {out / 'checkpoints' / 'step-4'}" in err[0]
    assert "Traceback" not in text


def test_checkpoint_inspect(reference2, tmp_path):  # noqa: F811
    ck = reference2[0] / "checkpoints" / "step-6"
    code, text = run(["checkpoint", "inspect", str(reference2[0])])  # a run dir: its newest checkpoint
    assert code == 0, text
    assert f"{ck}: step 6 (pretrain)" in text and "complete" in text
    assert "world 2 = tp 1 x pp 1 x dp 2" in text and "zero_stage 1" in text
    assert "model.embed.weight" in text and "optim.exp_avg.layers.0.attn.wo.weight" in text
    code, text = run(["checkpoint", "inspect", str(ck), "--json"])
    s = json.loads(text[text.index("{"):])
    keys = {t[0]: t for t in s["tensors"]}
    assert keys["model.embed.weight"][2] == [320, 64]  # the full shape, whoever wrote it
    assert s["step"] == 6 and s["layout"]["dp"] == 2
    assert s["bytes"] == sum(p.stat().st_size for p in ck.iterdir() if p.name not in ("manifest.json", "COMPLETE"))
    code, text = run(["checkpoint", "inspect", str(tmp_path)])
    assert code == 2 and "no checkpoint here" in text


def test_a_checkpoint_in_the_old_per_layout_format_is_refused(corpus, reference, tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    ck = out / "checkpoints" / "step-6"
    for p in list(ck.iterdir()):
        if p.name.endswith(".distcp") or p.name == ".metadata" or p.name == "manifest.json":
            p.unlink()
    torch.save({"module": {}}, ck / "mp_rank_00_model_states.pt")  # what DeepSpeed's engine wrote
    code, text = run(train_args(corpus, out, extra=["train.max_steps=7"]))
    assert code == 2, text[-3000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and "older megads" in err[0] and "init_from" in err[0], err
