"""One run per output directory: an OS lock, a run id, and what an output dir already holds.

The lock is `flock` on `<output_dir>/.megads.lock`, held by rank 0 for the life of its process:
the kernel drops it when the process ends however it ends (kill -9 included), so there is never a
stale lock to clean up. The file's text (pid, host, run id, start time) only says who holds it.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import secrets
import socket
from pathlib import Path

from megads.errors import MegadsError

LOCK_FILE = ".megads.lock"


class RunDirError(MegadsError):
    """The output dir is in use, or holds another run that would be overwritten."""


def new_run_id() -> str:
    """Sortable and unique enough: UTC start time plus 6 random hex digits."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class RunLock:
    """An exclusive, non-blocking lock on an output dir. `acquire()` raises RunDirError naming the
    holder when another process has it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        """Take the lock (nothing is written yet: a run that is then refused leaves the dir as it
        was); `announce` writes who holds it once the run goes ahead."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"{self.dir}: cannot create the run lock {self.path.name} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"{self.dir}: another run is using this output dir ({holder or 'holder starting up'}); "
                                  f"wait for it, stop it, or choose another train.output_dir") from None
            raise RunDirError(f"{self.dir}: cannot lock {self.path.name} ({e.strerror})") from None
        self.fd = fd
        return self

    def announce(self, run_id: str) -> None:
        info = (f"pid {os.getpid()} on host {socket.gethostname()}, run {run_id}, "
                f"since {datetime.datetime.now().isoformat(timespec='seconds')}")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (info + "\n").encode(), 0)

    def release(self, refused: bool = False) -> None:
        """Drop the lock; a refused run also removes the lock file it created itself."""
        if self.fd is None:
            return
        try:
            if refused and self.created:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def previous_run(output_dir: str | os.PathLike) -> list[str]:
    """What a fresh run would overwrite or mix with: checkpoints (complete or not), final/ and
    metrics.jsonl, as names relative to the output dir."""
    out = Path(output_dir)
    found = []
    ck = out / "checkpoints"
    if ck.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(ck.iterdir())
                  if p.name.startswith(("step-", ".tmp-step-"))]
    if (out / "final").exists():
        found.append("final/")
    m = out / "metrics.jsonl"
    if m.is_file() and m.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def clear_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """`--force`: remove what `previous_run` lists (and the old TensorBoard events), so the new
    run's checkpoints and metrics never mix with the old one's. Returns what was removed."""
    import shutil

    out = Path(output_dir)
    gone = previous_run(out)
    for name in ("checkpoints", "final", "tensorboard"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    return gone
