"""Atomic, verified training checkpoints on top of DeepSpeed's engine checkpoints.

Layout: `<output_dir>/checkpoints/step-<N>/` holding DeepSpeed's files (model, optimizer, ZeRO
partitions), `rank<R>.pt` (RNG streams, routed-expert shards), `trainer_state.pt` (step, data
position, run id, config, layout), `manifest.json` (every file's size and SHA-256) and, last of
all, `COMPLETE`.

A save writes into `.tmp-step-<N>`; every rank's failure (a full disk, any OSError) is agreed
over all ranks, so every rank raises the same `SaveError`, the temporary dir is removed, and the
previous checkpoints stay as they were. Only when every file is written and hashed does rank 0
write the manifest, rename the directory and write COMPLETE; only then are checkpoints beyond
`keep_last` removed. Loading verifies the manifest first (rank 0, agreed), so a truncated or
altered file is one line naming it, on every rank alike.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megads.checkpoint import manifest as mf
from megads.errors import CheckpointError, MegadsError

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")
EXIT_SAVE_FAILED = 4


class SaveError(MegadsError):
    """A checkpoint could not be written (disk full, I/O error). Exit code 4; nothing lost."""

    exit_code = EXIT_SAVE_FAILED
    every_rank = True


def _shared(e: MegadsError) -> MegadsError:
    e.every_rank = True  # raised alike on every rank: rank 0 alone prints it
    return e


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(output_dir: str) -> list[tuple[int, Path, bool]]:
    """(step, dir, complete) of every `step-N` dir, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d, (d / mf.COMPLETE).is_file()))
    return sorted(found)


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [d for _, d, ok in step_dirs(output_dir) if ok]


def latest_checkpoint(output_dir: str) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def previous_complete(path: Path) -> Path | None:
    """The newest complete checkpoint older than `path` in the same checkpoints dir."""
    m = _STEP_DIR.match(path.name)
    if not m:
        return None
    older = [d for s, d, ok in step_dirs(str(path.parent.parent)) if ok and s < int(m.group(1))]
    return older[-1] if older else None


# ------------------------------------------------------------------ collectives
def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(errors: list) -> str | None:
    return next((e for e in errors if e), None)


# ------------------------------------------------------------------ RNG
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------ save
def describe_write_error(e: BaseException, path) -> str:
    """One line for a failed write: 'no space left on device writing …' when the disk is full."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    full = any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain)
    text = " ".join(str(x) for x in chain)
    if not full and ("No space left" in text or "unexpected pos" in text or "write failed" in text):
        try:  # torch.save reports a short write without the errno: look at the disk
            full = shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free < (16 << 20)
        except OSError:
            pass
    if full:
        return f"no space left on device writing {path}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"cannot write {path} ({type(e).__name__}: {first})"


def _track_writes(engine) -> None:
    """Remember the file DeepSpeed's checkpoint engine is writing, to name it when a write fails."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce, "_megads_tracked", False):
        return
    inner = ce.save

    def save(state_dict, path, *a, **kw):
        ce._megads_writing = path
        return inner(state_dict, path, *a, **kw)

    ce.save = save
    ce._megads_tracked = True


def _fail_if_any(err: str | None, tmp: Path) -> None:
    errors = _gather(err)
    first = _first_error(errors)
    if first is None:
        return
    rank, _ = _rank_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    raise SaveError(f"{first}; checkpoint not saved, the previous checkpoints are kept")


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, keep_last: int,
                    rank_state: dict | None = None, extra=None) -> Path:
    """Collective: every rank calls it. Returns the final directory; raises SaveError (on every
    rank) when any rank could not write its part.

    rank_state: tensors only this rank holds and DeepSpeed does not save per rank (routed-expert
    shards under expert parallelism), written beside the RNG state; extra: any other per-rank
    object (a stage's state, e.g. GRPO's rollout buffer), returned by load_checkpoint."""
    rank, world = _rank_world()
    root = checkpoint_root(output_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            err = describe_write_error(e, tmp)
    _fail_if_any(err, tmp)

    _track_writes(engine)
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    except Exception as e:
        err = describe_write_error(e, getattr(engine.checkpoint_engine, "_megads_writing", tmp))
        _barrier()  # the barrier DeepSpeed's save ends with, which the other ranks are waiting in
    if err is None and rank == 0:
        for script in root.glob("*.py"):  # DeepSpeed's recovery scripts (zero_to_fp32.py …) go with
            try:                           # the checkpoint they convert, not beside it
                os.replace(script, tmp / script.name)
            except OSError:
                pass
    if err is None:
        target = tmp / f"rank{rank}.pt"
        try:
            plain = {k: v.detach().cpu().clone() for k, v in (rank_state or {}).items()}  # no param attributes
            torch.save({"rng": rng_state(), "rank_state": plain, "extra": extra}, target)
        except Exception as e:
            err = describe_write_error(e, target)
    _fail_if_any(err, tmp)

    # every file is written: hash them, a slice per rank, then rank 0 completes the checkpoint
    names = [n for n in mf.list_files(tmp)]
    try:
        mine, err = mf.hash_files(tmp, names[rank::world]), None
    except OSError as e:
        mine, err = {}, f"cannot read back {tmp} ({e.strerror})"
    parts = _gather((mine, err))
    _fail_if_any(_first_error([p[1] for p in parts]), tmp)
    result = None
    if rank == 0:
        target, old = tmp / "trainer_state.pt", root / f".old-step-{step}"
        try:
            files = {k: v for p in parts for k, v in p[0].items()}
            torch.save(trainer_state, target)
            files.update(mf.hash_files(tmp, ["trainer_state.pt"]))
            target = tmp / mf.MANIFEST
            mf.write_manifest(tmp, files, {"step": step, "world": world, "run_id": trainer_state.get("run_id")})
            _fsync_dir(tmp)
            if final.exists():  # a complete checkpoint of the same step: set aside until the new one is in
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            target = final / mf.COMPLETE
            with open(target, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        except Exception as e:
            result = describe_write_error(e, target)
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                os.replace(old, final)  # put the earlier checkpoint of this step back
        else:
            for stale in list(root.glob(".tmp-step-*")) + list(root.glob(".old-step-*")):
                shutil.rmtree(stale, ignore_errors=True)
            for old_ckpt in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old_ckpt, ignore_errors=True)
    result = _from_rank0(result)
    if result is not None:
        raise SaveError(f"{result}; checkpoint not saved, the previous checkpoints are kept")
    return final


# ------------------------------------------------------------------ load
def _damaged(msg: str, path: Path) -> CheckpointError:
    prev = previous_complete(path)
    hint = (f"; the previous complete checkpoint is {prev}: resume from it with --resume {prev}" if prev
            else "; no older complete checkpoint to fall back on")
    return _shared(CheckpointError(msg + hint))


def read_trainer_state(path: Path, checksums: bool = True) -> dict:
    """Collective: verify the checkpoint against its manifest (rank 0, agreed by all) and return
    its trainer state. CheckpointError naming the bad file, on every rank alike."""
    rank, _ = _rank_world()
    err = None
    if rank == 0:
        try:
            mf.verify(path, checksums=checksums)
        except mf.ManifestMissing:  # COMPLETE but written before manifests: load it unverified
            log.warning("%s: no %s (an older megads checkpoint): its files are not verified", path, mf.MANIFEST)
        except CheckpointError as e:
            err = str(e)
    err = _from_rank0(err)
    if err is not None:
        raise _damaged(err, path)
    f = path / "trainer_state.pt"
    try:
        return torch.load(f, weights_only=False)
    except Exception as e:
        raise _damaged(f"{f}: unreadable ({type(e).__name__})", path) from None


def load_checkpoint(engine, path: Path, rank_state: dict | None = None):
    """Collective: restore engine (model, optimizer, ZeRO state), this rank's RNG and its
    rank_state tensors (copied in place into the given dict's tensors). Call read_trainer_state
    first: it verifies the files."""
    rank, _ = _rank_world()
    err = None
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            err = f"{path}: DeepSpeed found no checkpoint files"
    except Exception as e:  # unreadable or mismatched files
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        err = f"{path}: cannot load the engine state ({type(e).__name__}: {first})"
    rank_file = path / f"rank{rank}.pt"
    if err is None:
        try:
            saved = torch.load(rank_file, weights_only=False)
            set_rng_state(saved["rng"])
            extra = saved.get("extra")
            for name, t in (rank_state or {}).items():
                if name not in saved["rank_state"]:
                    err = f"{rank_file}: no tensor {name!r} (another parallel layout?)"
                    break
                with torch.no_grad():
                    t.copy_(saved["rank_state"][name])
        except FileNotFoundError:
            err = f"{rank_file}: missing (was the checkpoint written with another number of ranks?)"
        except Exception as e:
            err = f"{rank_file}: unreadable ({type(e).__name__})"
    first = _first_error(_gather(err))
    if first is not None:
        raise _damaged(first, path)
    return extra


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
