"""Graceful stop on SIGTERM / SIGINT: finish the step, save, leave with 128 + signal number.

SLURM and Kubernetes send SIGTERM before they kill a job (a grace period: SLURM's KillWait, the
pod's terminationGracePeriodSeconds, the DeepSpeed launcher's 30 s), Ctrl-C sends SIGINT. The
handler only records the request; the training loop asks `requested()` at the end of every
optimizer step (agreed over all ranks, so a signal that reached one rank stops them all), writes
a complete checkpoint and exits with `EXIT_CODES[signal]`.

A second signal (during the rest of the step or during that save) aborts at once (`os._exit`):
saves go to a temporary directory that is renamed only when complete, so the previous checkpoint
is never damaged. A
repeat of the same signal within `DEBOUNCE_S` of the first is the same request, not a second
one: `kill -TERM -PGID` (what SLURM does) reaches a rank directly and again through its launcher,
which forwards what it receives to its children a few milliseconds later.
"""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
DEBOUNCE_S = 1.0


def _say(line: str) -> None:
    """Write from a signal handler: one os.write, no buffered stream that may be mid-write."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class GracefulStop:
    """Installs handlers for SIGTERM and SIGINT in the main thread; `restore()` puts the old ones
    back. `requested()` is the signal received (or None). `announce` (rank 0) prints one line when
    the first signal arrives; `saving` only changes the wording of the abort line."""

    def __init__(self, enabled: bool = True, announce: bool = False):
        self.enabled = enabled
        self.announce = announce
        self.signum: int | None = None
        self.first_at = 0.0
        self.saving = False
        self.done = False  # the stop's checkpoint is complete: later signals change nothing
        self._old: dict[int, object] = {}
        if enabled:
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            if self.announce:
                _say(f"megads: {signal.Signals(signum).name} received: finishing this step, then saving a "
                     f"checkpoint (send it again to abort without saving)")
            return
        if now - self.first_at < DEBOUNCE_S or self.done:
            return  # the launcher forwarding the same request, or the save is complete: leaving anyway
        where = "during the checkpoint save" if self.saving else "before the checkpoint save"
        _say(f"megads: second {signal.Signals(signum).name} {where}: aborting now; "
             f"the previous complete checkpoint is intact")
        os._exit(EXIT_CODES.get(signum, 128 + signum))

    def requested(self) -> int | None:
        return self.signum

    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + (self.signum or 0))

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def restore(self) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):  # not the main thread / a handler from C
                pass
        self._old = {}
