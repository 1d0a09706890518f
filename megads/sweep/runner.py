"""Running a sweep: each point is an ordinary `megads train` (or `megads launch`) process in its own
output dir, one after another, resumable.

Per point, `points/<name>/sweep_point.json` records its overrides, attempts and wall time; `done`
once its run exited 0. A rerun of the sweep skips done points, resumes an interrupted one from its
newest complete checkpoint (`--resume auto`), and restarts one that died before its first
checkpoint (`--resume none --force`, which clears what it left). A point whose recorded overrides
differ from the sweep file's is refused (one line naming it) unless --force, which reruns every
point from scratch. SIGINT/SIGTERM are handed to the running point, which saves a checkpoint and
exits; the sweep then stops with its exit code and says how to resume. A failed point (exit code
other than 0, 130, 143) is reported and the sweep goes on with the next; the exit code is 1 then.

`--point I` runs one point (a SLURM array task: launch/sweep.sbatch); `--collect` only gathers the
results, fits and plots (after an array job).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from megads.errors import ConfigError
from megads.sweep.spec import Point, Sweep, load_sweep

RECORD = "sweep_point.json"
INTERRUPTED = (130, 143)


def read_record(p: Point) -> dict:
    try:
        return json.loads((p.out / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _write_record(p: Point, rec: dict) -> None:
    p.out.mkdir(parents=True, exist_ok=True)
    tmp = p.out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, p.out / RECORD)


def status(p: Point) -> str:
    """done | resume (a complete checkpoint) | restart (an earlier attempt left no complete
    checkpoint) | fresh."""
    from megads.checkpoint import store

    if read_record(p).get("done"):
        return "done"
    if store.latest_checkpoint(str(p.out)) is not None:
        return "resume"
    leftovers = [x for x in ("metrics.jsonl", "checkpoints", "final") if (p.out / x).exists()]
    return "restart" if leftovers else "fresh"


def command(sw: Sweep, p: Point, how: str) -> list[str]:
    """The `megads train` (one process) or `megads launch` (several ranks) command of a point."""
    sets = [a for o in p.overrides + [f"train.output_dir={p.out}"] for a in ("--set", o)]
    extra = ["--resume", "none", "--force"] if how in ("restart", "force") else []
    if p.nproc == 1 and p.launcher == "python":
        return [sys.executable, "-m", "megads", "train", sw.base, *sets, *extra]
    return [sys.executable, "-m", "megads", "launch", sw.base, *sets, "--nproc", str(p.nproc),
            "--launcher", p.launcher, *extra]


class _Forwarder:
    """While a point runs: SIGINT/SIGTERM go to it (it saves a checkpoint and exits), not to us."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on_signal(self, signum, frame):
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signum)
            except ProcessLookupError:
                pass

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def run_point(sw: Sweep, p: Point, how: str, fwd: _Forwarder, say) -> int:
    """Run (or resume) one point; its output goes to points/<name>/train.log. Returns its exit code."""
    rec = read_record(p)
    if how == "force":
        rec = {}
    rec.update({"name": p.name, "overrides": p.overrides, "nproc": p.nproc, "launcher": p.launcher,
                "done": False})
    rec["attempts"] = rec.get("attempts", 0) + 1
    _write_record(p, rec)
    cmd = command(sw, p, how)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(p.out / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        fwd.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        code = fwd.child.wait()
        fwd.child = None
    code = 128 - code if code < 0 else code
    rec["seconds"] = rec.get("seconds", 0.0) + time.perf_counter() - t0
    rec["exit_code"] = code
    rec["done"] = code == 0
    _write_record(p, rec)
    return code


def run_sweep(path: str, overrides: list[str] = (), force: bool = False, point: str | None = None,
              collect: bool = True, run: bool = True, list_points: bool = False, count: bool = False) -> int:
    """`megads sweep`. Returns the exit code: 0, 1 (some point failed), or a point's 130/143."""
    sw = load_sweep(path, overrides)
    if count:
        print(len(sw.points))
        return 0
    if list_points:
        for p in sw.points:
            sets = " ".join(o for o in p.overrides if o.split("=")[0] in p.varied or o.startswith("train.max_steps="))
            print(f"{p.index:3d}  {p.name:40s}  [{status(p)}]  {sets}")
        print(f"{len(sw.points)} points; output {sw.output_dir}")
        return 0
    sw.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = sw.output_dir / "sweep.log"

    def say(msg: str) -> None:
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    # what was run, resolved (array tasks write the same file: each one whole, then renamed)
    tmp = sw.output_dir / f".sweep.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"sweep": sw.raw, "file": sw.path,
                               "points": [{"index": p.index, "name": p.name, "overrides": p.overrides,
                                           "nproc": p.nproc, "launcher": p.launcher} for p in sw.points]},
                              indent=1, default=str) + "\n")
    os.replace(tmp, sw.output_dir / "sweep.json")
    todo = [sw.point(point)] if point is not None else sw.points
    failed = []
    if run:
        _check_records(sw, todo, force)
        say(f"sweep {sw.name}: {len(todo)} point(s) -> {sw.output_dir}")
        with _Forwarder() as fwd:
            for i, p in enumerate(todo):
                how = "force" if force else status(p)
                if how == "done":
                    say(f"[{i + 1}/{len(todo)}] {p.name}: done before ({read_record(p).get('seconds', 0):.0f} s): skipped")
                    continue
                say(f"[{i + 1}/{len(todo)}] {p.name}: {'resuming' if how == 'resume' else 'training'} "
                    f"(log {p.out / 'train.log'})")
                code = run_point(sw, p, how, fwd, say)
                secs = read_record(p).get("seconds", 0.0)
                if code in INTERRUPTED or fwd.signum is not None:
                    say(f"sweep stopped at {p.name} (exit {code}); its checkpoint is kept: run the same command "
                        f"again to resume it and the points after it")
                    return code if code else 128 + fwd.signum
                if code != 0:
                    failed.append(p.name)
                    say(f"[{i + 1}/{len(todo)}] {p.name}: FAILED (exit {code}) after {secs:.0f} s; see {p.out / 'train.log'}")
                    continue
                say(f"[{i + 1}/{len(todo)}] {p.name}: done in {secs:.0f} s{_brief(p)}")
    if collect and point is None:
        from megads.sweep.collect import collect_sweep

        collect_sweep(sw, say)
    if failed:
        say(f"{len(failed)} point(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _check_records(sw: Sweep, todo: list[Point], force: bool) -> None:
    """A point dir that was run with other overrides is not silently reused (or mixed)."""
    if force:
        return
    for p in todo:
        rec = read_record(p)
        if rec and rec.get("overrides") != p.overrides:
            old, new = set(rec.get("overrides") or []), set(p.overrides)
            diff = ", ".join(sorted(old ^ new)[:4])
            raise ConfigError(f"{p.out}: point {p.name} was run with other settings ({diff}); pass --force to "
                              f"rerun every point, or choose another sweep.output_dir")


def _brief(p: Point) -> str:
    """', valid loss X' from the point's metrics, when it has one."""
    try:
        lines = (p.out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return ""
    vals = [json.loads(x)["valid_loss"] for x in lines if '"valid_loss"' in x]
    return f", valid loss {vals[-1]:.4f}" if vals else ""
