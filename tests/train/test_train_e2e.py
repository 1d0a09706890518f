"""End-to-end pre-training: 1 and 2 processes, exact resume after kill -9, a crash during a
checkpoint write, non-finite steps, and user errors (message + exit code 2)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, faults_env, megads, step_losses, train_args


def test_single_process_trains_logs_and_checkpoints(reference):
    out, losses, r = reference
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.3, losses  # it learns
    recs = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    step = [x for x in recs if "loss" in x][0]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "lm_loss", "balance_loss"):
        assert key in step, key
    assert any("valid_loss" in x for x in recs)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-2", "step-4", "step-6"]
    assert (out / "final" / "model.safetensors").is_file()
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    assert "samples:" in r.stdout + r.stderr


def test_two_processes_deepspeed_launcher(corpus, tmp_path):
    ds = Path(sys.executable).with_name("deepspeed")
    args = train_args(corpus, tmp_path, steps=4, extra=["parallel.zero_stage=1"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([str(ds), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
                        "--no_local_rank", "--module", "megads", *args], cwd=str(ROOT), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(step_losses(tmp_path)) == [1, 2, 3, 4]


def _run_until_step(args, out, step, env=None):
    """Start training and SIGKILL it once `step` is in metrics.jsonl."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.Popen([sys.executable, "-m", "megads", *args], cwd=str(ROOT), env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    metrics = Path(out, "metrics.jsonl")
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and step in step_losses(out):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    return p.returncode


def test_kill9_and_resume_gives_identical_losses(corpus, reference, tmp_path):
    _, ref, _ = reference
    rc = _run_until_step(train_args(corpus, tmp_path), tmp_path, 3)
    assert rc == -signal.SIGKILL
    r = megads(*train_args(corpus, tmp_path))  # resumes from the latest complete checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    got = step_losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, got, ref)


def test_crash_during_checkpoint_write_resumes_from_previous(corpus, reference, tmp_path):
    _, ref, _ = reference
    r = megads(*train_args(corpus, tmp_path), env=faults_env("kill:4"))
    assert r.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-4").is_dir() and not (root / "step-4").exists()
    assert (root / "step-2" / "COMPLETE").is_file()
    r = megads(*train_args(corpus, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints/step-2" in r.stdout + r.stderr
    assert not (root / ".tmp-step-4").exists()  # the next save of step 4 replaced the debris
    got = step_losses(tmp_path)
    for s in range(1, 7):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0)


def test_nonfinite_step_is_skipped_and_counted(corpus, tmp_path):
    r = megads(*train_args(corpus, tmp_path, steps=4), env=faults_env("nan:1"))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in Path(tmp_path, "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["skipped"] for x in recs] == [0, 1, 0, 0]
    assert recs[-1]["bad_steps_total"] == 1
    assert "update skipped" in r.stdout + r.stderr


def test_consecutive_bad_steps_stop_with_checkpoint_of_last_good_state(corpus, tmp_path):
    r = megads(*train_args(corpus, tmp_path, steps=8, extra=["train.max_bad_steps=3", "train.save_interval=100"]),
               env=faults_env("nan:1,nan:2,nan:3"))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "consecutive bad steps" in r.stdout + r.stderr
    import torch

    st = torch.load(tmp_path / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=False)
    assert st["bad_steps_total"] == 3


@pytest.mark.parametrize("sets,needle", [
    (["train.nosuch=1"], "train.nosuch: unknown key"),
    (["train.max_steps=abc"], "train.max_steps: expected an integer"),
    (["model.topk_group=9"], "model.topk_group"),
    (["train.global_batch_size=3"], "train.global_batch_size"),
])
def test_config_errors_are_one_line_exit_2(corpus, tmp_path, sets, needle):
    args = train_args(corpus, tmp_path, extra=sets)
    r = megads(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_is_a_clear_error(corpus, tmp_path):
    r = megads(*train_args(corpus, tmp_path, extra=[f"data.paths=[{tmp_path / 'nope'}]"]))
    assert r.returncode == 2
    assert "nope" in r.stderr and "Traceback" not in r.stderr


def test_generate_cli_from_the_final_model(reference):
    out, _, _ = reference
    r = megads("generate", "--checkpoint", str(out / "final"), "--prompt", "def", "--prompt", "# doc 1",
               "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- prompt 0: 'def'" in r.stdout and "--- prompt 1: '# doc 1'" in r.stdout
    r = megads("generate", "--checkpoint", str(out / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr
