"""Fail fast when a rank is lost: a heartbeat watchdog and readable collective errors.

Without help, a rank whose peer died (or whose link was cut) sits in a collective until the
backend's timeout, and then prints a backend-specific traceback that never says which rank went
away. The watchdog turns that into one line on stderr and a non-zero exit, within
`parallel.timeout_s`, on every surviving rank:

    megads: error: lost rank 1 (no heartbeat for 17 s); exiting

How: every rank runs a daemon thread with its own client connection to the job's rendezvous
TCPStore (the store torch.distributed was initialised with: hosted by rank 0 under the DeepSpeed
launcher, mpiexec and plain env://, by the agent under torchrun). Every `period` seconds:

  * each rank increments its counter `hb/<rank>` (one round trip, so it also proves the store
    and the link to it are alive);
  * rank 0 reads every counter in one `multi_get` and notes, on its own monotonic clock, when each
    last changed (so clocks of different hosts never need to agree). A rank whose counter has
    not moved for `stale_after` seconds is lost: rank 0 publishes `verdict = "<rank> <reason>"`,
    gives the others two periods to read it, and exits;
  * the other ranks read rank 0's counter and the verdict. A verdict, a stale rank-0 counter, or
    a store that fails or stops answering (rank 0 died, or the link to it was cut) ends them.
    TCPStore requests have no reply timeout, so a second "dead-man" thread per rank watches the
    time since the last answered request.

Cost: two store round trips per rank per period; rank 0 reads N counters in one request, so the
store sees O(N) small requests a second, never O(N^2).

The process exits with `os._exit(1)`: the main thread may be blocked inside a collective that
would never return, so a clean interpreter shutdown is not an option.

`describe_collective_error(exc)` is the other half: when a collective fails in the main thread
first (gloo notices a dead peer's closed socket at once: "Connection closed by peer"), it names
the lost rank (directly in a world of two, from the watchdog's verdict otherwise).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import threading
import time

log = logging.getLogger(__name__)

LOST_RANK_EXIT = 1

# substrings of backend errors that mean "a peer process or the link to it is gone"
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "econnreset",
              "connection refused", "epipe", "no route to host", "communicator was aborted",
              "nccl communicator", "remote process exited", "socket closed", "connection closed",
              "connection was likely closed")
# substrings that mean "a collective waited longer than parallel.timeout_s"
_TIMED_OUT = ("timed out", "timeout", "deadline exceeded", "etimedout")

_exit_lock = threading.Lock()
_active: "Watchdog | None" = None


def fail(message: str, code: int = LOST_RANK_EXIT) -> None:
    """Print `megads: error: <message>; exiting` once and end the process now (no cleanup: other
    threads may be stuck in collectives)."""
    _exit_lock.acquire()  # never released: a second caller waits here until the process is gone
    try:
        sys.stdout.flush()
    except Exception:
        pass
    try:
        sys.stderr.write(f"megads: error: {message}; exiting\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _store_address() -> tuple[str, int] | None:
    """Host and port of the default process group's TCPStore (or MASTER_ADDR/MASTER_PORT)."""
    try:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        while hasattr(store, "underlying_store"):  # PrefixStore(s) around the real store
            store = store.underlying_store
        if isinstance(store, dist.TCPStore):
            return store.host, int(store.port)
    except Exception as e:  # not initialised, or a store kind without an address
        log.debug("default store: %s", e)
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return None


def timings(timeout_s: float) -> tuple[float, float]:
    """(period, stale_after) for a job whose lost ranks must be reported within timeout_s: beats
    every period (1 s, shorter for tiny timeouts); a rank is lost after stale_after without a beat,
    and rank 0 after stale_after without an answer from the store. Detection, the verdict's
    hand-over and the exit all fit in timeout_s."""
    period = min(1.0, timeout_s / 10.0)
    return period, timeout_s - 3 * period


class Watchdog:
    """The heartbeat of one rank (see the module docstring): an I/O thread that beats, reads and
    judges, and a dead-man thread that notices when the I/O thread hangs in a store request
    (TCPStore's `add` and `multi_get` wait for the answer without a timeout: a stopped rank 0 or a
    cut link would block them for the kernel's TCP timeout, a quarter of an hour)."""

    def __init__(self, rank: int, world: int, timeout_s: float, host: str, port: int,
                 prefix: str | None = None):
        self.rank, self.world = rank, world
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self.period, self.stale_after = timings(timeout_s)
        # a torchrun restart keeps the agent's store: keep each attempt's keys apart
        gen = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = prefix if prefix is not None else f"megads/heartbeat/{gen}/"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._store = None
        self._last_ok = time.monotonic()  # end of the last store round that answered
        self.lost: tuple[int, str] | None = None  # (rank, reason) once known
        self._lost_event = threading.Event()

    # ---------------------------------------------------------------- keys
    def _hb(self, r: int) -> str:
        return f"{self.prefix}hb/{r}"

    @property
    def _verdict(self) -> str:
        return f"{self.prefix}verdict"

    # ---------------------------------------------------------------- life cycle
    def start(self) -> "Watchdog":
        from torch.distributed import TCPStore

        self._store = TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=self.stale_after))
        self._store.add(self._hb(self.rank), 1)
        if self.rank == 0:
            self._store.add(self._verdict, 0)  # 0 = no verdict; add creates the key without overwriting
            for r in range(self.world):  # create every counter so multi_get never waits for one
                self._store.add(self._hb(r), 0)
        self._last_ok = time.monotonic()
        io = self._watch_all if self.rank == 0 else self._watch_rank0
        for target, name in ((io, "megads-heartbeat"), (self._deadman, "megads-heartbeat-deadman")):
            t = threading.Thread(target=self._guard(target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("heartbeat watchdog: rank %d/%d, store %s:%d, period %.1fs, lost after %.1fs",
                 self.rank, self.world, self.host, self.port, self.period, self.stale_after)
        return self

    def stop(self) -> None:
        """Stop judging at once; the threads end within a period (a hung request is abandoned:
        the threads are daemons)."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2 * self.period)
        self._threads = []

    def wait_lost(self, timeout: float) -> tuple[int, str] | None:
        """Block until a lost rank is known (or timeout); (rank, reason) or None."""
        self._lost_event.wait(timeout)
        return self.lost

    # ---------------------------------------------------------------- the threads
    def _guard(self, fn):
        def run():
            try:
                fn()
            except Exception as e:  # a bug in the watchdog must not end training
                if not self._stop.is_set():
                    log.error("heartbeat watchdog stopped: %s", e)
        return run

    def _declare(self, rank: int, reason: str) -> None:
        if self._stop.is_set():
            return
        self.lost = (rank, reason)
        self._lost_event.set()
        fail(f"lost rank {rank} ({reason})")

    def _store_failed(self, what: str) -> None:
        """The store did not answer: rank 0 (or the link to it) is gone."""
        where = f"rendezvous store at {self.host}:{self.port} {what}"
        if self.rank != 0:
            self._declare(0, where)
        elif not self._stop.is_set():  # rank 0's own store (or torchrun's agent on this node)
            fail(f"heartbeat {where}")

    def _deadman(self) -> None:
        while not self._stop.wait(self.period):
            waited = time.monotonic() - self._last_ok
            if waited > self.stale_after:
                self._store_failed(f"stopped answering for {waited:.0f} s")
                return

    def _round(self, keys: list[str]) -> list[bytes] | None:
        """Beat, then read `keys` in one request; None when stopping or after declaring."""
        t0 = time.monotonic()
        try:
            self._store.add(self._hb(self.rank), 1)
            values = self._store.multi_get(keys)
        except Exception as e:
            self._store_failed(f"failed after {time.monotonic() - t0:.0f} s: {_short(e)}")
            return None
        self._last_ok = time.monotonic()
        return None if self._stop.is_set() else values

    def _watch_all(self) -> None:
        """Rank 0: beat, read every counter, judge."""
        keys = [self._hb(r) for r in range(self.world)]
        last: list[bytes | None] = [None] * self.world
        seen = [time.monotonic()] * self.world
        while not self._stop.wait(self.period):
            values = self._round(keys)
            if values is None:
                return
            now = time.monotonic()
            for r, v in enumerate(values):
                if v != last[r]:
                    last[r], seen[r] = v, now
            stale = [(now - seen[r], r) for r in range(1, self.world) if now - seen[r] > self.stale_after]
            if stale:
                age, r = max(stale)
                reason = f"no heartbeat for {age:.0f} s"
                try:  # tell the others who is lost before this rank (and maybe the store) goes
                    self._store.set(self._verdict, f"{r} {reason}")
                    self._stop.wait(2 * self.period)
                except Exception:
                    pass
                self._declare(r, reason)
                return

    def _watch_rank0(self) -> None:
        """Every other rank: beat, read rank 0's counter and the verdict."""
        keys = [self._hb(0), self._verdict]
        last, seen = None, time.monotonic()
        while not self._stop.wait(self.period):
            values = self._round(keys)
            if values is None:
                return
            hb0, verdict = values
            now = time.monotonic()
            if verdict not in (b"", b"0"):
                r, _, reason = verdict.decode(errors="replace").partition(" ")
                self._declare(int(r), reason or "reported by rank 0")
                return
            if hb0 != last:
                last, seen = hb0, now
            elif now - seen > self.stale_after:
                self._declare(0, f"no heartbeat for {now - seen:.0f} s")
                return


def _short(e: BaseException, n: int = 160) -> str:
    """One line of an error: without gloo's `[file.cc:123] ` prefix and its advice tail."""
    s = " ".join(str(e).split()) or type(e).__name__
    s = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", s)
    s = s.split(". This is typically", 1)[0]
    return s if len(s) <= n else s[: n - 1] + "…"


# -------------------------------------------------------------------- module-level helpers
def start_watchdog(timeout_s: float) -> Watchdog | None:
    """Start this rank's watchdog when torch.distributed runs more than one rank (else None).
    Set MEGADS_HEARTBEAT=0 to disable it."""
    global _active
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2 or os.environ.get("MEGADS_HEARTBEAT", "1") == "0":
        return None
    addr = _store_address()
    if addr is None:
        log.warning("heartbeat watchdog disabled: no TCPStore address (MASTER_ADDR/MASTER_PORT unset)")
        return None
    try:
        _active = Watchdog(dist.get_rank(), dist.get_world_size(), timeout_s, *addr).start()
    except Exception as e:  # training can run without it; say why it is off
        log.warning("heartbeat watchdog disabled: cannot reach the store at %s:%d (%s)", *addr, _short(e))
        return None
    return _active


def stop_watchdog(watchdog: Watchdog | None, barrier: bool = False) -> None:
    """Stop the watchdog. With barrier=True (the normal end of a job) every rank stops its
    watchdog before any rank may leave: otherwise the rank hosting the store could exit while
    another rank's watchdog still polls it, and that rank would report rank 0 as lost."""
    global _active
    if watchdog is None:
        return
    watchdog.stop()
    if _active is watchdog:
        _active = None
    if barrier:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def describe_collective_error(exc: BaseException, wait_s: float | None = None) -> str | None:
    """A one-line message naming the lost rank for a failed collective, or None when `exc` is
    not a lost-peer or timeout error (let it propagate as a real bug).

    A world of two names the other rank at once. Larger worlds wait (up to wait_s, default
    the watchdog's detection time) for the watchdog, which knows whose heartbeat stopped."""
    import torch.distributed as dist

    chain = _chain(exc)
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain).lower()
    from_backend = any(type(e).__name__.startswith("Dist") or isinstance(e, (ConnectionError, TimeoutError))
                       for e in chain) or any(k in text for k in ("gloo", "nccl", "c10d", "processgroup"))
    if not from_backend:
        return None  # not from torch.distributed: a real bug, keep its traceback
    gone = any(s in text for s in _PEER_GONE)
    timed_out = any(s in text for s in _TIMED_OUT)
    if not (gone or timed_out):
        return None
    detail = _short(chain[-1] if gone else exc)
    wd = _active
    if wd is not None and wd.lost is not None:
        r, reason = wd.lost
        return f"lost rank {r} ({reason})"
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if gone and world == 2:
        return f"lost rank {1 - rank} (collective failed: {detail})"
    if wd is not None:
        found = wd.wait_lost(wait_s if wait_s is not None else wd.timeout_s)
        if found is not None:
            return f"lost rank {found[0]} ({found[1]})"
        if timed_out:
            return (f"a collective timed out (parallel.timeout_s = {wd.timeout_s:g}) although every rank's "
                    f"heartbeat is alive: a rank is stuck or much slower than the others ({detail})")
    if gone:
        return f"lost a peer rank (collective failed: {detail})"
    return f"a collective timed out; a rank is lost or stuck ({detail})"


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out
