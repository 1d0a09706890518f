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
    return subprocess.call(cmd)
