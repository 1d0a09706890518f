"""The launchers and launch/ scripts: the tiny preset trains a few steps on 2 gloo ranks under the
DeepSpeed launcher, torchrun, mpiexec (mpi4py discovery) and SLURM-style srun tasks; every script
parses (bash -n, shellcheck when installed) and assembles the documented command."""
from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
BIN = Path(sys.executable).parent
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), LAUNCH / "slurm.sbatch"])
STEPS = 3
QUICK = [f"train.max_steps={STEPS}", "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.eval_interval=1000", "train.save_interval=1000", "train.samples_at_end=0", "train.progress=false",
         "train.tensorboard=false", "parallel.timeout_s=120"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(out: Path, extra=()) -> list[str]:
    return [a for s in [*QUICK, f"train.output_dir={out}", *extra] for a in ("--set", s)]


def env(**kw) -> dict:
    """The scripts get this venv's tools by name (python, deepspeed, torchrun; mpiexec sits next to
    python), not by a changed PATH: PATH also picks the `ninja` that DeepSpeed's JIT ops are built
    with, and ninja versions disagree on what is up to date (a PATH switch rebuilds the shared
    torch_extensions cache, minutes on 2 cores). One thread per rank."""
    e = dict(os.environ, PYTHON=sys.executable, DEEPSPEED=str(BIN / "deepspeed"), TORCHRUN=str(BIN / "torchrun"),
             PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGADS_LOG="INFO")
    e.update({k: str(v) for k, v in kw.items()})
    return e


def run(cmd: list[str], log: Path, timeout: float = 240, **kw) -> tuple[int, str, float]:
    """Run in its own session (so a hang can be ended with its whole process group); return
    (exit code, output, seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            code = "timeout"
    return code, log.read_text(), time.monotonic() - t0


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            pytest.fail(f"port {port} stayed busy for {timeout:.0f} s; DeepSpeed's MPI discovery needs it on rank 0")
        time.sleep(1)


def train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module", autouse=True)
def builtin_data():
    """The tiny preset's builtin corpus, built once (the ranks would otherwise race to time it)."""
    r = subprocess.run([sys.executable, "-m", "megads", "prepare-data", "configs/tiny.yaml"], cwd=str(ROOT),
                       env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def check_run(code, output, secs, out: Path, what: str):
    print(f"{what}: exit {code} in {secs:.1f} s")
    assert code == 0, f"{what} exited {code}:\n{output[-4000:]}"
    assert train_steps(out) == list(range(1, STEPS + 1)), output[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    # every rank watched the others' heartbeats, and nobody was reported lost at the end
    for r in (0, 1):
        assert f"heartbeat watchdog: rank {r}/2" in output, output[-3000:]
    assert "lost rank" not in output, output[-3000:]


# ------------------------------------------------------------------------------ real runs
def test_deepspeed_launcher_two_ranks(tmp_path):
    """`deepspeed --num_gpus 2 --no_local_rank --module megads train …` (via deepspeed_no_ssh.sh
    with one node, which is that command)."""
    out = tmp_path / "run"
    code, output, secs = run([str(LAUNCH / "deepspeed_no_ssh.sh"), "configs/tiny.yaml", *sets(out)],
                             tmp_path / "log", env=env(NPROC=2, MASTER_PORT=free_port()))
    check_run(code, output, secs, out, "deepspeed --num_gpus 2")


def test_torchrun_two_ranks(tmp_path):
    out = tmp_path / "run"
    code, output, secs = run([str(LAUNCH / "torchrun.sh"), "configs/tiny.yaml", *sets(out)], tmp_path / "log",
                             env=env(NPROC=2))
    check_run(code, output, secs, out, "torchrun --standalone --nproc_per_node 2")


def test_mpiexec_two_ranks(tmp_path):
    """mpiexec -n 2 python -m megads train …: ranks from mpi4py, rendezvous at rank 0's
    `hostname -I` address, port MASTER_PORT (default 29500)."""
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists() and not shutil.which("mpiexec"):
        pytest.skip("no mpiexec in the venv or on PATH (pip install mpich)")
    out = tmp_path / "run"
    code, output, secs = run([str(LAUNCH / "mpirun.sh"), "configs/tiny.yaml", *sets(out)], tmp_path / "log",
                             env=env(NPROC=2, PYTHON=sys.executable, MASTER_PORT=free_port()))
    check_run(code, output, secs, out, "mpiexec -n 2")


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: start SLURM_NTASKS tasks of the command here, as srun would on one node
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_slurm_tasks_mode_two_ranks(tmp_path):
    """slurm.sbatch in its default mode (one srun task per GPU) with stand-ins for srun and
    scontrol: each task derives RANK/LOCAL_RANK/WORLD_SIZE from SLURM_* and meets the others at
    the first host of the node list."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "run"
    e = env(SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=os.getpid(), SLURM_NNODES=1, SLURM_NTASKS=2,
            SLURM_NTASKS_PER_NODE=2, SLURM_TASKS_PER_NODE="2", MASTER_PORT=free_port())
    e["PATH"] = f"{fake}{os.pathsep}{e['PATH']}"
    code, output, secs = run(["bash", str(LAUNCH / "slurm.sbatch"), "configs/tiny.yaml", *sets(out)],
                             tmp_path / "log", env=e)
    assert "rendezvous localhost:" in output, output[:2000]
    check_run(code, output, secs, out, "slurm.sbatch (srun tasks)")


# ------------------------------------------------------------------------------ the scripts
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK) or script.suffix == ".sbatch", f"{script.name} is not executable"


def test_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def dry(script: str, *args: str, **kw) -> str:
    r = subprocess.run(["bash", str(LAUNCH / script), "cfg.yaml", *args], capture_output=True, text=True,
                       env=env(DRY_RUN=1, **kw), cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dry_run_commands(tmp_path):
    extra = ("--set", "train.output_dir=/tmp/a b")  # quoting survives
    cmd = dry("deepspeed_hostfile.sh", *extra, HOSTFILE=LAUNCH / "hostfile.example", NNODES=2, NPROC=8,
              MASTER_ADDR="10.0.0.1", MASTER_PORT=29555)
    for part in ("--hostfile", "--launcher pdsh", "--num_nodes 2", "--num_gpus 8", "--master_addr 10.0.0.1",
                 "--master_port 29555", "--module megads train cfg.yaml", r"train.output_dir=/tmp/a\ b"):
        assert part in cmd, (part, cmd)

    cmd = dry("deepspeed_no_ssh.sh", NNODES=2, NODE_RANK=1, NPROC=4, MASTER_ADDR="10.0.0.1")
    for part in ("--no_ssh", "--node_rank 1", "--num_nodes 2", "--master_addr 10.0.0.1", "--num_gpus 4"):
        assert part in cmd, (part, cmd)

    cmd = dry("torchrun.sh", NPROC=2)
    assert "--nproc_per_node 2 --standalone -m megads train cfg.yaml" in cmd, cmd
    cmd = dry("torchrun.sh", NNODES=2, NPROC=8, MASTER_ADDR="10.0.0.1", RDZV_ID="j1")
    for part in ("--nnodes 2", "--rdzv_backend c10d", "--rdzv_endpoint 10.0.0.1:29500", "--rdzv_id j1"):
        assert part in cmd, (part, cmd)
    cmd = dry("torchrun.sh", NNODES=2, NPROC=8, MASTER_ADDR="10.0.0.1", RDZV="static", NODE_RANK=1)
    assert "--node_rank 1 --master_addr 10.0.0.1 --master_port 29500" in cmd, cmd

    cmd = dry("mpirun.sh", NPROC=3, NNODES=2)
    assert " -n 6 " in cmd and "-m megads train cfg.yaml" in cmd, cmd

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho gpu-a\necho gpu-b\n")
    (fake / "scontrol").chmod(0o755)
    slurm = dict(SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID=1234, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=8,
                 PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    cmd = dry("slurm.sbatch", **slurm)
    assert cmd.startswith("srun") and "SLURM_PROCID" in cmd and "-m megads train cfg.yaml" in cmd, cmd
    cmd = dry("slurm.sbatch", MODE="launcher", **slurm)
    assert "--ntasks-per-node=1" in cmd and "torch.distributed.run" in cmd, cmd

    # misuse: a clear message and exit 2, nothing started
    for script, kw in (("deepspeed_no_ssh.sh", dict(NNODES=2, NPROC=1)), ("torchrun.sh", dict(NNODES=2)),
                       ("deepspeed_hostfile.sh", dict(HOSTFILE="/nonexistent"))):
        r = subprocess.run(["bash", str(LAUNCH / script), "cfg.yaml"], capture_output=True, text=True,
                           env=env(DRY_RUN=1, **kw))
        assert r.returncode != 0 and r.stderr.strip(), (script, r.returncode, r.stderr)
