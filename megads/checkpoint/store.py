"""Atomic, verified, layout-independent training checkpoints (torch.distributed.checkpoint).

Layout: `<output_dir>/checkpoints/step-<N>/` holding DCP's files (`__<rank>_0.distcp`, one per
rank, written in parallel, and `.metadata`: which slice of which full tensor each file holds; see
megads.checkpoint.sharded for what is in them: model, router biases, AdamW moments, RNG streams),
`trainer_state.pt` (step, data position, run id, config, layout), `manifest.json` (every file's
size and SHA-256) and, last of all, `COMPLETE`. A checkpoint written under one parallel layout
resumes under any other.

A save writes into `.tmp-step-<N>`; every rank's failure (a full disk, any OSError) is agreed
over all ranks, so every rank raises the same `SaveError`, the temporary dir is removed, and the
previous checkpoints stay as they were. Only when every file is written and hashed does rank 0
write the manifest, rename the directory and write COMPLETE; only then are checkpoints beyond
`keep_last` removed. Loading verifies the manifest first (rank 0, agreed), so a truncated or
altered file is one line naming it, on every rank alike. An asynchronous save (DCP's
`async_save`, `train.async_save`) writes from a background thread and is completed (manifest,
rename, COMPLETE) at the next save, at the end of the run or on a signal.
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
FORMAT = "megads-dcp/1"  # torch.distributed.checkpoint files + trainer_state.pt + manifest
EXIT_SAVE_FAILED = 4


def _checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


_RAISED = (Exception, _checkpoint_exception())  # DCP's CheckpointException is a BaseException


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
def unwrap(e: BaseException) -> BaseException:
    """The first underlying error of a torch.distributed.checkpoint CheckpointException (which
    derives from BaseException and carries each failing rank's exception), else e."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        return first[0] if isinstance(first, tuple) else first
    return e


def describe_write_error(e: BaseException, path) -> str:
    """One line for a failed write: 'no space left on device writing …' when the disk is full."""
    e = unwrap(e)
    if isinstance(e, OSError) and e.filename:
        path = e.filename
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


class PendingSave:
    """An asynchronous save in flight: DCP writes the files from a background thread while
    training goes on; `finish_save` waits for it and completes the checkpoint (manifest, rename,
    COMPLETE). Until then the step exists only as `.tmp-step-N`, which a resume ignores."""

    def __init__(self, future, tmp: Path, final: Path, step: int, trainer_state: dict, keep_last: int,
                 output_dir: str, seconds_blocked: float):
        self.future, self.tmp, self.final, self.step = future, tmp, final, step
        self.trainer_state, self.keep_last, self.output_dir = trainer_state, keep_last, output_dir
        self.seconds_blocked = seconds_blocked


def save_checkpoint(state: dict, output_dir: str, step: int, trainer_state: dict, keep_last: int,
                    async_group=None):
    """Collective: every rank calls it with its part of the sharded training state
    (megads.checkpoint.sharded.state_for_save). Returns the final directory, or a PendingSave
    when `async_group` (a gloo group of every rank, for the background thread's collectives) is
    given; raises SaveError (on every rank) when any rank could not write its part."""
    import time

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    rank, _ = _rank_world()
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
    writer = FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True, thread_count=1)
    t0 = time.perf_counter()
    if async_group is not None:
        try:
            fut = dcp.async_save(state, storage_writer=writer, process_group=async_group)
        except _RAISED as e:
            err = describe_write_error(e, tmp)
        _fail_if_any(err, tmp)
        return PendingSave(fut, tmp, final, step, trainer_state, keep_last, output_dir, time.perf_counter() - t0)
    try:
        dcp.save(state, storage_writer=writer)
    except _RAISED as e:
        err = describe_write_error(e, tmp)
    _fail_if_any(err, tmp)
    return _complete(tmp, final, step, trainer_state, keep_last, output_dir)


def finish_save(pending: PendingSave) -> Path:
    """Collective: wait for an asynchronous save, then complete it (or raise SaveError on every
    rank, removing it: the previous checkpoints stay)."""
    err = None
    try:
        pending.future.result()
    except _RAISED as e:
        err = describe_write_error(e, pending.tmp)
    _fail_if_any(err, pending.tmp)
    return _complete(pending.tmp, pending.final, pending.step, pending.trainer_state, pending.keep_last,
                     pending.output_dir)


def _complete(tmp: Path, final: Path, step: int, trainer_state: dict, keep_last: int, output_dir: str) -> Path:
    """Collective: every file is written: hash them, a slice per rank, then rank 0 writes the
    trainer state and the manifest, renames the directory and writes COMPLETE."""
    rank, world = _rank_world()
    root = tmp.parent
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
            mf.write_manifest(tmp, files, {"step": step, "world": world, "run_id": trainer_state.get("run_id"),
                                           "format": FORMAT})
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
                if stale != tmp:
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


def is_sharded(path: Path) -> bool:
    """A torch.distributed.checkpoint checkpoint (megads's layout-independent format)."""
    return (path / ".metadata").is_file()


def legacy_error(path: Path) -> CheckpointError:
    return _shared(CheckpointError(
        f"{path}: written by an older megads in DeepSpeed's per-layout format, which this version no longer "
        f"reads; start a new run from that run's final/ model (train.init_from), or resume it with megads "
        f"from before sharded checkpoints (commit 76ddcde)"))


def load_checkpoint(path: Path, model, optimizer, ds_optimizer, ps, same_layout: bool,
                    load_optimizer: bool = True):
    """Collective: restore the model, the optimizer state and (in the layout that wrote it) this
    rank's RNG streams from a sharded checkpoint written by any layout. Returns this rank's extra
    object (an objective's state), or None under another layout. Call read_trainer_state first:
    it verifies the files."""
    from megads.checkpoint import sharded

    if not is_sharded(path):
        raise legacy_error(path)
    err, blob = None, None
    try:
        blob = sharded.load_into(path, model, optimizer, ds_optimizer, ps, own_rank_blob=same_layout,
                                 load_optimizer=load_optimizer)
        if blob is not None:
            set_rng_state(blob["rng"])
    except _RAISED as e:  # unreadable or mismatched files
        e = unwrap(e)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        err = f"{path}: cannot load the training state ({type(e).__name__}: {first})"
    first = _first_error(_gather(err))
    if first is not None:
        raise _damaged(first, path)
    return None if blob is None else blob.get("extra")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
