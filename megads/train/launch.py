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


def launch_command(config: str, overrides: list[str], nproc: int, launcher: str, train_args: list[str] = (),
                   launcher_args: list[str] = ()) -> list[str]:
    """The command line of a launcher starting `nproc` ranks of `megads train config`; train_args
    (--resume, --force, --verbose) go to `megads train`, launcher_args to the launcher."""
    train = ["train", str(config)] + [a for o in overrides for a in ("--set", o)] + list(train_args)
    if launcher == "deepspeed":
        return [_tool("deepspeed"), *launcher_args, "--num_gpus", str(nproc), "--master_port", str(_free_port()),
                "--no_local_rank", "--module", "megads"] + train
    if launcher == "torchrun":
        return [_tool("torchrun"), *launcher_args, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
                "-m", "megads"] + train
    if launcher == "mpiexec":
        return [_tool("mpiexec"), *launcher_args, "-n", str(nproc), sys.executable, "-m", "megads"] + train
    return [sys.executable, "-m", "megads"] + train


def launch_local(config: str, overrides: list[str], nproc: int | None = None, launcher: str = "deepspeed",
                 resume: str | None = None, force: bool = False, verbose: bool = False) -> int:
    """`megads launch`: check everything that can be checked in one process (the config, the
    layout over --nproc ranks, the batch sizes, the input files: megads.train.preflight), prepare
    the builtin corpus once, then start the ranks; on a CPU machine the launcher's INFO chatter is
    hidden unless `verbose`."""
    from megads.runtime.quiet import launcher_env_and_args
    from megads.train.preflight import check_launch

    if nproc is None:
        nproc = 1 if launcher == "python" else 2
    cfg = load_config(config, overrides)  # fail fast, in one process, on a bad config
    check_launch(cfg, nproc, launcher)
    if cfg.data.builtin_corpus:
        from megads.data import prepare_builtin

        prefix, tok = prepare_builtin(cfg.data)
        print(f"data: {prefix} (tokenizer {tok})", flush=True)
    env, launcher_args = launcher_env_and_args(launcher, verbose, nproc)
    train_args = (["--resume", resume] if resume else []) + (["--force"] if force else []) + (["--verbose"] if verbose else [])
    cmd = launch_command(config, overrides, nproc, launcher, train_args, launcher_args)
    print("launching:", " ".join(cmd), flush=True)
    return run_forwarding_signals(cmd, env)


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


def run_forwarding_signals(cmd: list[str], env: dict | None = None) -> int:
    """Run a launcher and hand SIGTERM/SIGINT to its ranks directly, then wait for its exit code.

    The DeepSpeed runner does not forward signals on one node (it just dies, leaving the ranks
    running), and DeepSpeed's per-node launcher forwards them one rank at a time with a 30 s kill.
    Sent to the ranks, the signal makes every rank save a checkpoint and exit 143/130, which the
    launchers then pass up as their own exit code."""
    import signal

    p = subprocess.Popen(cmd, start_new_session=True,  # Ctrl-C reaches us, not the launcher
                         env=dict(os.environ, **env) if env else None)

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
