"""Atomic training checkpoints on top of DeepSpeed's engine checkpoints.

Layout: <output_dir>/checkpoints/step-<N>/ holding DeepSpeed's files (model, optimizer, ZeRO
partitions), `trainer_state.pt` (step, data position, scheduler, counters), `rng-rank<R>.pt`, and
last of all `COMPLETE`. A save writes into `.tmp-step-<N>` and renames it after every rank has
finished, so a crash mid-save never leaves a directory that loads as valid; only directories
with COMPLETE are ever resumed from. The last `keep_last` are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megads.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / "COMPLETE").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir: str) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, keep_last: int,
                    rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    rank_state: tensors only this rank holds and DeepSpeed does not save per rank (routed-expert
    shards under expert parallelism), written beside the RNG state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(output_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    plain = {k: v.detach().cpu().clone() for k, v in (rank_state or {}).items()}  # no param attributes
    torch.save({"rng": rng_state(), "rank_state": plain}, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
        _fsync_dir(tmp)
        if final.exists():  # a complete checkpoint of the same step (re-save after resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / "COMPLETE").write_text(f"{step}\n")
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: Path, rank_state: dict | None = None) -> dict:
    """Restore engine (model, optimizer, ZeRO state), this rank's RNG and its rank_state tensors
    (copied in place into the given dict's tensors); return the trainer state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"{path}: not a complete megads checkpoint (no COMPLETE marker)")
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    except Exception as e:  # corrupt or mismatched files
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint files")
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing (was the checkpoint written with another number of ranks?)")
    saved = torch.load(rank_file, weights_only=False)
    set_rng_state(saved["rng"])
    for name, t in (rank_state or {}).items():
        if name not in saved["rank_state"]:
            raise CheckpointError(f"{rank_file}: no tensor {name!r} (different parallel layout?)")
        with torch.no_grad():
            t.copy_(saved["rank_state"][name])
    return state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
