"""Runs that lose nothing, on real processes (1 rank, and 2 ranks under the DeepSpeed launcher):
SIGTERM/SIGINT save and resume exactly; a second signal aborts without harm; one run per output
dir; no silent fresh start over a previous run or over incomplete checkpoints; config drift;
damaged checkpoint files; a full disk (a real tmpfs where root may mount one, and an ENOSPC
injected at torch.save on one rank of two)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, faults_env, megads, step_losses, train_args

SLOW = "steptime:0=0.4"  # a slow optimizer step, so a signal lands mid-run


def _env(extra=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.update(extra or {})
    return e


def _launch_cmd(args, nproc):
    if nproc == 1:
        return [sys.executable, "-m", "megads", *args]
    with socket.socket() as s:  # a port the OS says is free now (a pseudo-random one once hit a port in use)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port", str(port),
            "--no_local_rank", "--module", "megads", *args]


def start(args, log, nproc=1, env=None):
    """A run in its own process group (as a batch system starts one), output to `log`."""
    f = open(log, "w")
    return subprocess.Popen(_launch_cmd(args, nproc), cwd=str(ROOT), env=_env(env), stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(args, nproc=1, env=None, timeout=600):
    r = subprocess.run(_launch_cmd(args, nproc), cwd=str(ROOT), env=_env(env), capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def wait_for(cond, p=None, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if p is not None and p.poll() is not None:
            return cond()
        time.sleep(0.05)
    return False


def logged(out, step):
    m = Path(out, "metrics.jsonl")
    return m.is_file() and step in step_losses(out)


def listing(d):
    """Every path under d with size and mtime: 'nothing changed on disk' is equality of two."""
    return sorted((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(d).rglob("*"))


def rank_pids(launcher_pid):
    import psutil

    out = {}
    for c in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env = c.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "megads" in " ".join(c.cmdline()):
            out[int(env["RANK"])] = c.pid
    return out


def run_ids(out):
    return {json.loads(x).get("run_id") for x in Path(out, "metrics.jsonl").read_text().splitlines()}


def assert_same_losses(got, ref):
    assert sorted(got) == sorted(ref), (got, ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, got[s], ref[s])


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


TWO = ["parallel.zero_stage=1"]


@pytest.fixture(scope="module")
def reference2(corpus, tmp_path_factory):
    """The uninterrupted 2-rank (DP 2, ZeRO-1) run under the DeepSpeed launcher."""
    out = tmp_path_factory.mktemp("ref2")
    code, text = run(train_args(corpus, out, extra=TWO), nproc=2)
    assert code == 0, text[-3000:]
    return out, step_losses(out)


# ------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_then_resume_gives_identical_losses(corpus, reference, tmp_path, sig, code):
    _, ref, _ = reference
    args = train_args(corpus, tmp_path, extra=["train.save_interval=100"])  # no periodic save before
    p = start(args, tmp_path / "log", env=faults_env(SLOW))
    assert wait_for(lambda: logged(tmp_path, 2), p)
    p.send_signal(sig)
    assert p.wait(timeout=120) == code
    text = (tmp_path / "log").read_text()
    last = max(step_losses(tmp_path))
    assert 2 <= last < 6, last
    ck = tmp_path / "checkpoints" / f"step-{last}"
    line = [x for x in text.splitlines() if "stopped by" in x]
    assert len(line) == 1 and signal.Signals(sig).name in line[0] and str(ck) in line[0] and "resume" in line[0]
    code_v, out_v = run(["checkpoint", "verify", str(ck)])
    assert code_v == 0 and "OK" in out_v, out_v
    code2, text2 = run(args)
    assert code2 == 0, text2[-3000:]
    assert f"resumed from {ck} at step {last}" in text2
    assert_same_losses(step_losses(tmp_path), ref)
    assert len(run_ids(tmp_path)) == 1  # the resumed run continues the same run id


def test_sigterm_to_the_deepspeed_launchers_process_group(corpus, reference2, tmp_path):
    _, ref = reference2
    args = train_args(corpus, tmp_path, extra=[*TWO, "train.save_interval=100"])
    p = start(args, tmp_path / "log", nproc=2, env=faults_env(SLOW))
    assert wait_for(lambda: logged(tmp_path, 2), p)
    os.killpg(p.pid, signal.SIGTERM)  # what SLURM / a pod's stop does: every process of the job
    p.wait(timeout=60)  # DeepSpeed's runner itself just dies of SIGTERM on one node
    assert wait_for(lambda: not _group_alive(p.pid), timeout=120), "ranks still running"
    text = (tmp_path / "log").read_text()
    assert text.count("stopped by SIGTERM") == 1, text[-3000:]
    last = max(step_losses(tmp_path))
    assert (tmp_path / "checkpoints" / f"step-{last}" / "COMPLETE").is_file()
    code, text = run(args, nproc=2)
    assert code == 0, text[-3000:]
    assert_same_losses(step_losses(tmp_path), ref)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_to_megads_launch_reaches_every_rank(corpus, reference2, tmp_path):
    _, ref = reference2
    sets = train_args(corpus, tmp_path, extra=[*TWO, "train.save_interval=100"])[2:]
    p = start(["launch", "configs/tiny.yaml", "--nproc", "2", *sets], tmp_path / "log", env=faults_env(SLOW))
    assert wait_for(lambda: logged(tmp_path, 2), p)
    p.send_signal(signal.SIGTERM)  # to `megads launch` alone: it hands the signal to the ranks
    assert p.wait(timeout=180) == 143, (tmp_path / "log").read_text()[-3000:]
    assert not _group_alive(p.pid)
    last = max(step_losses(tmp_path))
    assert (tmp_path / "checkpoints" / f"step-{last}" / "COMPLETE").is_file()
    code, text = run(train_args(corpus, tmp_path, extra=TWO), nproc=2)
    assert code == 0, text[-3000:]
    assert_same_losses(step_losses(tmp_path), ref)


def test_signal_to_one_rank_stops_every_rank_with_a_checkpoint(corpus, reference2, tmp_path):
    _, ref = reference2
    args = train_args(corpus, tmp_path, extra=[*TWO, "train.save_interval=100"])
    p = start(args, tmp_path / "log", nproc=2, env=faults_env(SLOW))
    assert wait_for(lambda: logged(tmp_path, 2), p)
    pids = rank_pids(p.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGINT)  # rank 1 alone
    assert p.wait(timeout=180) == 130, (tmp_path / "log").read_text()[-3000:]
    last = max(step_losses(tmp_path))
    code_v, out_v = run(["checkpoint", "verify", str(tmp_path)])
    assert code_v == 0 and f"step-{last}" in out_v, out_v
    code, text = run(args, nproc=2)
    assert code == 0, text[-3000:]
    assert_same_losses(step_losses(tmp_path), ref)


def test_second_signal_during_the_save_aborts_and_keeps_the_previous_checkpoint(corpus, reference, tmp_path):
    _, ref, _ = reference
    args = train_args(corpus, tmp_path)  # saves at 2, 4, 6; saves from step 3 on are slowed down
    p = start(args, tmp_path / "log", env=faults_env(f"{SLOW},sleep:3+=1.5"))
    root = tmp_path / "checkpoints"
    assert wait_for(lambda: logged(tmp_path, 3), p)
    p.send_signal(signal.SIGTERM)
    assert wait_for(lambda: any(int(d.name.rsplit("-", 1)[1]) >= 3 for d in root.glob(".tmp-step-*")), p)
    time.sleep(1.2)  # past the debounce: a second, deliberate signal
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143
    assert time.time() - t0 < 5  # at once, not after the save
    text = (tmp_path / "log").read_text()
    assert "second SIGTERM during the checkpoint save" in text, text[-2000:]
    assert [d.name for d in sorted(root.iterdir()) if d.name.startswith("step-")] == ["step-2"]
    code_v, out_v = run(["checkpoint", "verify", str(root / "step-2")])
    assert code_v == 0, out_v
    code, text = run(args)
    assert code == 0, text[-3000:]
    assert "checkpoints/step-2 at step 2" in text
    assert_same_losses(step_losses(tmp_path), ref)


# ------------------------------------------------------------------------------ one run per dir
def test_lock_refuses_a_second_run_and_dies_with_its_holder(corpus, reference, tmp_path):
    _, ref, _ = reference
    args = train_args(corpus, tmp_path)
    p = start(args, tmp_path / "log", env=faults_env("steptime:0=3.0"))  # slow enough to outlast the second start-up
    assert wait_for(lambda: (tmp_path / "checkpoints" / "step-2" / "COMPLETE").is_file(), p)
    code, text = run(args)
    assert code == 2, text[-2000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and str(tmp_path) in err[0] and f"pid {p.pid}" in err[0] and socket.gethostname() in err[0]
    assert "Traceback" not in text
    assert p.poll() is None  # the holder was not disturbed
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    code, text = run(args)  # the dead holder's lock is free: this run resumes
    assert code == 0, text[-3000:]
    assert "resumed from" in text
    assert_same_losses(step_losses(tmp_path), ref)


def test_fresh_run_over_a_previous_run_is_refused_unless_forced(corpus, reference, tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    before = listing(out)
    args = train_args(corpus, out)
    code, text = run([*args, "--resume", "none"])
    assert code == 2 and "already holds a run" in text and "--force" in text, text[-2000:]
    assert listing(out) == before
    old_id = run_ids(reference[0])
    code, text = run([*args, "--resume", "none", "--force"])
    assert code == 0, text[-3000:]
    assert "--force: removed the previous run's" in text
    ids = run_ids(out)
    assert len(ids) == 1 and ids != old_id  # only the new run's rows
    assert sorted(step_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_metrics_without_checkpoints_are_not_overwritten(corpus, tmp_path):
    args = train_args(corpus, tmp_path, extra=["train.save_interval=100"])
    p = start(args, tmp_path / "log", env=faults_env(SLOW))
    assert wait_for(lambda: logged(tmp_path, 1), p)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not (tmp_path / "checkpoints").exists()
    before = listing(tmp_path)
    code, text = run(args)  # --resume auto, nothing to resume, but a previous run's metrics
    assert code == 2 and "metrics.jsonl" in text and "already holds a run" in text, text[-2000:]
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", ["died-in-first-save", "copy-without-complete"])
def test_no_complete_checkpoint_is_refused_and_nothing_changes(corpus, reference, tmp_path, how):
    if how == "died-in-first-save":
        out = tmp_path
        r = megads(*train_args(corpus, out), env=faults_env("kill:2"))
        assert r.returncode == -signal.SIGKILL
        names = [".tmp-step-2"]
    else:
        out = copy_run(reference[0], tmp_path / "run")
        for d in (out / "checkpoints").iterdir():
            (d / "COMPLETE").unlink()
        names = ["step-2", "step-4", "step-6"]
    before = listing(out)
    code, text = run(train_args(corpus, out))
    assert code == 2, text[-2000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and "no complete checkpoint" in err[0] and "--resume none --force" in err[0]
    assert all(n in err[0] for n in names), err[0]
    assert listing(out) == before


# ------------------------------------------------------------------------------ config drift
@pytest.mark.parametrize("sets,code,needle", [
    (["model.hidden_size=96"], 2, "model.hidden_size 64 -> 96"),  # shape
    (["model.score_func=softmax"], 2, "model.score_func 'sigmoid' -> 'softmax'"),  # same shapes, other meaning
    (["train.lr=0.01"], 2, "train.lr 0.003 -> 0.01"),  # another run, unless --force
    (["train.lr=0.01", "--force"], 0, "train.lr changed 0.003 -> 0.01"),
    (["train.max_steps=8", "train.eval_interval=4"], 0, "train.max_steps changed 6 -> 8"),  # allowed, logged
])
def test_config_drift_on_resume(corpus, reference, tmp_path, sets, code, needle):
    out = copy_run(reference[0], tmp_path / "run")
    extra = [s for s in sets if s != "--force"]
    args = train_args(corpus, out, extra=extra) + (["--force"] if "--force" in sets else [])
    before = listing(out)
    got, text = run(args)
    assert got == code, text[-3000:]
    assert needle in text, text[-3000:]
    assert "Traceback" not in text
    if code == 2:
        err = [x for x in text.splitlines() if "megads: error" in x]
        assert len(err) == 1 and "step-6" in err[0], err
        assert listing(out) == before
    elif "train.max_steps=8" in sets:
        assert sorted(step_losses(out)) == list(range(1, 9))


# ------------------------------------------------------------------------------ damaged files
def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("name,damage", [
    ("__0_0.distcp", _truncate),  # rank 0's DCP file: model, optimizer moments, RNG streams
    ("__0_0.distcp", _flip),  # same size, other bytes: the checksum
    (".metadata", _truncate),  # DCP's index of which slice lives where
    ("trainer_state.pt", _truncate),
    ("manifest.json", _truncate),
])
def test_damaged_checkpoint_file_is_one_line_naming_it(corpus, reference, tmp_path, name, damage):
    out = copy_run(reference[0], tmp_path / "run")
    bad = out / "checkpoints" / "step-6" / name
    damage(bad)
    code, text = run(train_args(corpus, out))
    assert code == 2, text[-3000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and str(bad) in err[0], text[-3000:]
    assert f"--resume {out / 'checkpoints' / 'step-4'}" in err[0]
    assert "Traceback" not in text
    code, text = run(["checkpoint", "verify", str(out)])
    assert code == 2 and f"BAD  {bad}" in text and text.count("OK   ") == 2, text


def test_unreadable_file_without_checksums_is_still_one_line(corpus, reference, tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    bad = out / "checkpoints" / "step-6" / "trainer_state.pt"
    b = bytearray(bad.read_bytes())  # its zip header: a middle byte may land in a pickled number and still load
    b[:4] = b"\0\0\0\0"
    bad.write_bytes(bytes(b))
    code, text = run(train_args(corpus, out, extra=["train.verify_on_resume=false"]))
    assert code == 2, text[-3000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and str(bad) in err[0] and "unreadable" in err[0], err


def test_damaged_partition_of_rank1_two_ranks(corpus, reference2, tmp_path):
    out = copy_run(reference2[0], tmp_path / "run")
    bad = out / "checkpoints" / "step-6" / "__1_0.distcp"  # rank 1's shard of the sharded checkpoint
    assert bad.is_file(), sorted(p.name for p in bad.parent.iterdir())
    _truncate(bad)
    code, text = run(train_args(corpus, out, extra=TWO), nproc=2)
    assert code == 2, text[-3000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and str(bad) in err[0], text[-3000:]  # said once, by rank 0


# ------------------------------------------------------------------------------ full disk
def _tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _assert_full_disk_outcome(code, text, out):
    assert code == 4, text[-3000:]
    err = [x for x in text.splitlines() if "megads: error" in x]
    assert len(err) == 1 and "no space left on device writing" in err[0] and ".tmp-step-4" in err[0], text[-3000:]
    assert "Traceback" not in text
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]  # no debris, the previous one kept
    code_v, out_v = run(["checkpoint", "verify", str(root / "step-2")])
    assert code_v == 0, out_v


def test_full_disk_on_a_real_tmpfs(corpus, reference, tmp_path):
    step2 = reference[0] / "checkpoints" / "step-2"
    size = sum(p.stat().st_size for p in step2.rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, int(size * 1.5) + (256 << 10)):
        pytest.skip("cannot mount a tmpfs here (not root); test_full_disk_injected_on_one_rank covers ENOSPC")
    try:
        out = mnt / "run"
        code, text = run(train_args(corpus, out, extra=["train.tensorboard=false"]))
        _assert_full_disk_outcome(code, text, out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_injected_on_one_rank_of_two(corpus, tmp_path):
    code, text = run(train_args(corpus, tmp_path, extra=TWO), nproc=2, env=faults_env("enospc:4:1"))
    _assert_full_disk_outcome(code, text, tmp_path)


def test_checkpoint_from_before_manifests_still_resumes(corpus, reference, tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    (out / "checkpoints" / "step-6" / "manifest.json").unlink()  # as megads wrote them before manifests
    code, text = run(train_args(corpus, out, extra=["train.max_steps=7"]))
    assert code == 0, text[-3000:]
    assert "are not verified" in text and "resumed from" in text
