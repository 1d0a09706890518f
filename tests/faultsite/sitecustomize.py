"""Test-only faults, loaded by Python at start-up when this folder is on PYTHONPATH (see
tests/train/conftest.py `faults_env`). Nothing here is in megads itself: it wraps `torch.save` and the file
streams of torch.distributed.checkpoint so a checkpoint write can be slowed, fail with ENOSPC, or kill the process, in every process a launcher
starts.

MEGADS_TEST_FAULTS: comma-separated `kind:step[:rank][=arg]` entries, acting on files written into
`.tmp-step-<step>` by rank <rank> (any rank when omitted; a step `N+` means N and later):
  sleep:<step>[:<rank>]=<seconds>   sleep before each such write
  enospc:<step>[:<rank>]            raise OSError(ENOSPC) instead of writing
  kill:<step>[:<rank>]              SIGKILL the process right after the first such write
  steptime:0=<seconds>              sleep in every optimizer step (a slow model, to signal mid-run)
  nan:<step>                        make the loss of (0-based) optimizer step <step> NaN
"""
import os

_SPEC = os.environ.get("MEGADS_TEST_FAULTS", "")

if _SPEC:
    import errno
    import re
    import signal
    import time

    import torch

    _faults = []
    for item in filter(None, (x.strip() for x in _SPEC.split(","))):
        head, _, arg = item.partition("=")
        parts = head.split(":")
        _faults.append((parts[0], parts[1], int(parts[2]) if len(parts) > 2 else None,
                        float(arg) if arg else 0.0))
    _real_save = torch.save

    def _rank() -> int:
        for k in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
            if k in os.environ:
                return int(os.environ[k])
        return 0

    def _step_matches(want: str, step: int) -> bool:
        return step >= int(want[:-1]) if want.endswith("+") else step == int(want)

    def _save(obj, f, *a, **kw):
        m = re.search(r"\.tmp-step-(\d+)", str(f))
        hits = [x for x in _faults if m and x[0] != "steptime" and _step_matches(x[1], int(m.group(1)))
                and x[2] in (None, _rank())]
        for kind, _, _, arg in hits:
            if kind == "sleep":
                time.sleep(arg)
            elif kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        out = _real_save(obj, f, *a, **kw)
        if any(k == "kill" for k, *_ in hits):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    torch.save = _save

    # torch.distributed.checkpoint writes its files through FileSystem.create_stream
    import contextlib

    from torch.distributed.checkpoint import filesystem as _fs

    _real_stream = _fs.FileSystem.create_stream

    @contextlib.contextmanager
    def _stream(self, path, mode):
        m = re.search(r"\.tmp-step-(\d+)", str(path))
        hits = [x for x in _faults if "w" in mode and m and x[0] != "steptime"
                and _step_matches(x[1], int(m.group(1))) and x[2] in (None, _rank())]
        for kind, _, _, arg in hits:
            if kind == "sleep":
                time.sleep(arg)
            elif kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with _real_stream(self, path, mode) as s:
            yield s
        if any(k == "kill" for k, *_ in hits):
            os.kill(os.getpid(), signal.SIGKILL)

    _fs.FileSystem.create_stream = _stream

    _steptime = [x[3] for x in _faults if x[0] == "steptime"]
    if _steptime:
        _real_step = torch.optim.AdamW.step

        def _slow_step(self, *a, **kw):
            time.sleep(_steptime[0])
            return _real_step(self, *a, **kw)

        torch.optim.AdamW.step = _slow_step

    _nan_steps = {int(x[1]) for x in _faults if x[0] == "nan"}
    if _nan_steps:
        from megads.train.loop import Trainer

        _real_micro = Trainer._micro_loss

        def _nan_micro(self, batch, denom):
            loss, mets = _real_micro(self, batch, denom)
            if self.step in _nan_steps:
                loss = loss * float("nan")
                mets = {**mets, "loss": loss.detach()}
            return loss, mets

        Trainer._micro_loss = _nan_micro
