"""Start-up noise, hidden unless `--verbose`: what DeepSpeed and torch print that tells a megads
user nothing (INFO chatter, "Setting accelerator to CPU" on a machine that has no GPU, a C++ op
announcing it was built, the ZeRO "untested optimizer" warning megads knowingly triggers, torch's
deprecation notices from inside DeepSpeed). Warnings and errors that matter still get through:
only these known messages are filtered. Every rank applies it (`megads train`), so no rank's
chatter breaks rank 0's progress bar; `megads launch` also quiets the launcher itself.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "MEGADS_VERBOSE"

# DeepSpeed's logger (one object for the library, its accelerator detection and its launcher)
_DS_DROP = re.compile(r"Setting accelerator to CPU|untested optimizer|Unable to find hostfile")
# bare print()s of DeepSpeed on stdout
_PRINT_DROP = re.compile(r"^DeepSpeed \S+ built successfully\s*$")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def no_gpu() -> bool:
    """True on a machine without CUDA (checked without initialising it)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


class _DeepSpeedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and not _DS_DROP.search(record.getMessage())


class _LineFilter(io.TextIOBase):
    """A stdout wrapper that drops whole lines matching a pattern; everything else (progress-bar
    carriage returns included) passes through unchanged."""

    def __init__(self, stream):
        self._stream = stream
        self._pending = ""

    def write(self, s: str) -> int:
        text = self._pending + s
        self._pending = ""
        out = []
        for line in text.splitlines(keepends=True):
            complete = line.endswith(("\n", "\r"))
            if not complete and (line.startswith("DeepSpeed") or "DeepSpeed".startswith(line)):
                self._pending = line  # maybe a line to drop: decided at its end
                continue
            if not (complete and _PRINT_DROP.match(line)):
                out.append(line)
        if out:
            self._stream.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name):  # buffer, errors, reconfigure, …: the wrapped stream's
        return getattr(self._stream, name)


def quiet_startup(want_verbose: bool = False) -> None:
    """Hide the known start-up noise of this process (call before DeepSpeed is imported).
    With `want_verbose` (or MEGADS_VERBOSE=1) nothing is hidden and megads logs at INFO."""
    if want_verbose or verbose():
        os.environ[VERBOSE_ENV] = "1"
        logging.getLogger("megads").setLevel(logging.INFO)
        return
    if no_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "Setting accelerator to CPU" warning
    logging.getLogger("DeepSpeed").addFilter(_DeepSpeedFilter())
    for op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf".*torch\.distributed\.{op}.* is deprecated", category=FutureWarning)
    if not isinstance(sys.stdout, _LineFilter):
        sys.stdout = _LineFilter(sys.stdout)


def launcher_env_and_args(launcher: str, want_verbose: bool, nproc: int) -> tuple[dict, list[str]]:
    """(environment additions, extra launcher arguments) that quiet a launcher on a CPU machine."""
    env: dict = {}
    if want_verbose:
        env[VERBOSE_ENV] = "1"
        return env, []
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun warns when it has to choose; choose as the trainer would
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    if not no_gpu():
        return env, []
    env["DS_ACCELERATOR"] = "cpu"
    return env, (["--log_level", "error"] if launcher == "deepspeed" else [])
