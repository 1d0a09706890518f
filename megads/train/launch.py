"""`megads launch`: start N local ranks of `megads train` through a real launcher.

The DeepSpeed launcher is the default (`deepspeed --num_gpus N --module megads train …`; on a CPU
machine it starts N gloo ranks); torchrun and mpiexec (mpi4py discovery) work the same way.
The builtin corpus is prepared once here, before the ranks start.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from megads.config import load_config
from megads.errors import MegadsError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    found = local if os.path.exists(local) else shutil.which(name)
    if not found:
        raise MegadsError(f"launcher {name!r} not found (install it or choose --launcher python)")
    return found


def launch_command(config: str, overrides: list[str], nproc: int, launcher: str) -> list[str]:
    train = ["train", str(config)] + [a for o in overrides for a in ("--set", o)]
    if launcher == "deepspeed":
        return [_tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()),
                "--no_local_rank", "--module", "megads"] + train
    if launcher == "torchrun":
        return [_tool("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
                "-m", "megads"] + train
    if launcher == "mpiexec":
        return [_tool("mpiexec"), "-n", str(nproc), sys.executable, "-m", "megads"] + train
    return [sys.executable, "-m", "megads"] + train


def launch_local(config: str, overrides: list[str], nproc: int = 2, launcher: str = "deepspeed") -> int:
    cfg = load_config(config, overrides)  # fail fast, in one process, on a bad config
    if cfg.data.builtin_corpus:
        from megads.data import prepare_builtin

        prefix, tok = prepare_builtin(cfg.data)
        print(f"data: {prefix} (tokenizer {tok})", flush=True)
    cmd = launch_command(config, overrides, nproc, launcher)
    print("launching:", " ".join(cmd), flush=True)
    return run_forwarding_signals(cmd)


def rank_processes(pid: int) -> list:
    """The training ranks below `pid`: the descendants whose environment names a rank."""
    import psutil

    found = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            env = c.environ()
        except (psutil.Error, OSError):
            continue
        if any(k in env for k in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")):
            found.append(c)
    return found


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run a launcher and hand SIGTERM/SIGINT to its ranks directly, then wait for its exit code.

    The DeepSpeed runner does not forward signals on one node (it just dies, leaving the ranks
    running), and DeepSpeed's per-node launcher forwards them one rank at a time with a 30 s kill.
    Sent to the ranks, the signal makes every rank save a checkpoint and exit 143/130, which the
    launchers then pass up as their own exit code."""
    import signal

    p = subprocess.Popen(cmd, start_new_session=True)  # Ctrl-C reaches us, not the launcher

    def forward(signum, frame):
        ranks = rank_processes(p.pid)
        for r in ranks:
            try:
                r.send_signal(signum)
            except Exception:
                pass
        if not ranks:  # not started yet (or a launcher we cannot see through): the launcher itself
            try:
                p.send_signal(signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = p.wait()
        return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    finally:
        for s, h in old.items():
            signal.signal(s, h)
