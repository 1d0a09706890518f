"""A lost rank ends every survivor within parallel.timeout_s, with a message naming it.

Three levels: the error classifier alone; the heartbeat watchdog in two small processes that
all-reduce in a loop (a rank killed, a rank frozen with SIGSTOP, rank 0 frozen so its store stops
answering, and a clean finish that must not be reported); and the real trainer: rank 1 killed
mid-training on one host, and the link between two network-namespace "nodes" cut mid-training.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megads.parallel import faults

ROOT = Path(__file__).resolve().parents[2]
# the two-node helpers live with the two-node test
_spec = importlib.util.spec_from_file_location("megads_test_multinode", Path(__file__).with_name("test_multinode.py"))
multinode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multinode)

SLACK = 12.0  # seconds beyond the timeout for process exit, launcher polling and a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the classifier
def test_describe_collective_error_names_the_peer_or_passes():
    assert faults.describe_collective_error(ValueError("bad value")) is None
    assert faults.describe_collective_error(RuntimeError("CUDA out of memory")) is None
    assert faults.describe_collective_error(RuntimeError("tokenizer download timed out")) is None  # not a backend's
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:5002")
    assert "lost a peer rank" in faults.describe_collective_error(gone)  # no process group here: rank unknown
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = ConnectionResetError("Connection reset by peer")
    assert faults.describe_collective_error(wrapped) is not None
    slow = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation")
    assert "timed out" in faults.describe_collective_error(slow)


def test_timings_fit_in_the_timeout():
    for timeout in (5.0, 20.0, 600.0):
        period, stale = faults.timings(timeout)
        assert 0 < period <= 1.0
        assert stale + 3 * period <= timeout + 1e-9 and stale >= 0.6 * timeout


# ------------------------------------------------------------------------------ the watchdog alone
HARNESS = r"""
import datetime, os, sys, time
import torch, torch.distributed as dist
from megads.parallel import faults
timeout = float(os.environ["T"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
wd = faults.start_watchdog(timeout)
print(f"rank {dist.get_rank()} up", flush=True)
x, t0, steps = torch.ones(256), time.monotonic(), 0
try:
    while True:
        # every rank leaves the loop at the same iteration: a rank deciding alone (its own clock)
        # could leave one all-reduce early, its peer then waiting on a collective nobody joins
        done = torch.tensor([float(time.monotonic() - t0 >= float(os.environ["RUN"]))])
        dist.all_reduce(done)
        if done.item() > 0:
            break
        dist.all_reduce(x)
        steps += 1
        time.sleep(0.02)
    faults.stop_watchdog(wd, barrier=True)
except Exception as e:
    msg = faults.describe_collective_error(e)
    if msg is None:
        raise
    faults.fail(msg)
dist.destroy_process_group()
print(f"rank {dist.get_rank() if dist.is_initialized() else '-'} done after {steps} all-reduces", flush=True)
"""
HARNESS_T = 10.0


def start_pair(tmp_path: Path, run_s: float) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in (0, 1):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   T=str(HARNESS_T), RUN=str(run_s), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", HARNESS], env=env, cwd=str(ROOT), text=True,
                                      stdout=open(tmp_path / f"out{r}", "w"), stderr=open(tmp_path / f"err{r}", "w")))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both ranks past init and watching
        if all("up" in (tmp_path / f"out{r}").read_text() for r in (0, 1)):
            return procs
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    pytest.fail(f"harness did not start: {(tmp_path / 'err0').read_text()[-2000:]}")


def last_error(path: Path) -> str:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("megads: error:")]
    return lines[-1] if lines else path.read_text()[-2000:]


def test_watchdog_quiet_on_a_clean_finish(tmp_path):
    procs = start_pair(tmp_path, run_s=4)
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"err{r}").read_text()[-2000:] for r in (0, 1)]
    assert "megads: error" not in (tmp_path / "err0").read_text() + (tmp_path / "err1").read_text()


@pytest.mark.parametrize("victim,sig,survivor_sees", [
    (1, signal.SIGKILL, "lost rank 1"),  # dead peer: gloo's closed socket, named at once
    (1, signal.SIGSTOP, "lost rank 1 (no heartbeat"),  # frozen peer: rank 0 sees its counter stop
    (0, signal.SIGSTOP, "lost rank 0 (rendezvous store"),  # frozen rank 0: its store stops answering
    (0, signal.SIGKILL, "lost rank 0"),
], ids=["kill-1", "stop-1", "stop-0", "kill-0"])
def test_watchdog_names_the_lost_rank(tmp_path, victim, sig, survivor_sees):
    procs = start_pair(tmp_path, run_s=600)
    survivor = procs[1 - victim]
    time.sleep(1.5)
    t0 = time.monotonic()
    procs[victim].send_signal(sig)
    try:
        code = survivor.wait(timeout=HARNESS_T + SLACK)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    took = time.monotonic() - t0
    err = last_error(tmp_path / f"err{1 - victim}")
    print(f"{sig.name} rank {victim}: rank {1 - victim} exit {code} after {took:.1f} s: {err}")
    assert code == faults.LOST_RANK_EXIT, err
    assert survivor_sees in err and err.endswith("; exiting"), err
    assert took <= HARNESS_T + 2.0, f"took {took:.1f} s with parallel.timeout_s = {HARNESS_T}"


# ------------------------------------------------------------------------------ the trainer
def trainer_overrides(out: Path, timeout_s: float) -> list[str]:
    return [*multinode.QUICK, "train.max_steps=100000", f"train.output_dir={out}", f"parallel.timeout_s={timeout_s}"]


def wait_for_step(out: Path, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if multinode.train_steps(out):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.3)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("training never reached step 1:\n" + "\n".join(f"--- {lg.name}\n{lg.read_text()[-2500:]}" for lg in logs))


@pytest.fixture(scope="module")
def builtin_data():
    multinode.prepare_builtin_data()


def test_trainer_rank_killed_mid_training(builtin_data, tmp_path):
    """Two ranks of `megads train` on this host (started directly, so no launcher kills the
    survivor for us); SIGKILL rank 1 after step 1: rank 0 exits 1 naming rank 1."""
    timeout_s = 30.0
    out = tmp_path / "run"
    port = free_port()
    sets = [a for s in trainer_overrides(out, timeout_s) for a in ("--set", s)]
    procs, logs = [], []
    for r in (0, 1):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        logs.append(tmp_path / f"rank{r}.log")
        procs.append(subprocess.Popen([sys.executable, "-m", "megads", "train", "configs/tiny.yaml", *sets],
                                      env=env, cwd=str(ROOT), stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        wait_for_step(out, procs, logs)
        t0 = time.monotonic()
        procs[1].kill()
        code = procs[0].wait(timeout=timeout_s + SLACK)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    err = last_error(logs[0])
    print(f"trainer, rank 1 killed: rank 0 exit {code} after {took:.1f} s: {err}")
    assert code == faults.LOST_RANK_EXIT, logs[0].read_text()[-3000:]
    assert "lost rank 1" in err, err
    assert took <= timeout_s + 2.0


def test_trainer_link_cut_between_nodes(builtin_data, tmp_path):
    """Two nodes (network namespaces), one DeepSpeed launcher each; the veth goes down after
    step 1. Node 0's rank names rank 1, node 1's names rank 0, both within parallel.timeout_s."""
    why = multinode.TwoNodes.unavailable()
    if why:
        pytest.skip(f"link-cut test needs network namespaces: {why}")
    timeout_s = 20.0
    out = tmp_path / "run"
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    with multinode.TwoNodes() as nodes:
        port = free_port()
        procs = [nodes.launch(n, trainer_overrides(out, timeout_s), logs[n], port) for n in (0, 1)]
        try:
            wait_for_step(out, procs, logs)
            t0 = time.monotonic()
            nodes.cut(1)
            codes = multinode.wait_all(procs, timeout=timeout_s + SLACK)
            took = time.monotonic() - t0
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    errs = [last_error(lg) for lg in logs]
    print(f"link cut: exit codes {codes} after {took:.1f} s:\n  node 0: {errs[0]}\n  node 1: {errs[1]}")
    assert all(isinstance(c, int) and c != 0 for c in codes), (codes, errs)
    assert "lost rank 1" in errs[0], errs[0]
    assert "lost rank 0" in errs[1], errs[1]
    assert took <= timeout_s + SLACK
