"""What a run does with its output dir: resume which checkpoint, or start fresh, or refuse.

- `--resume auto`: the newest complete checkpoint. Checkpoint dirs present but none complete
  (a run that died in its first save, a copy that stopped half-way): refused, naming them; a
  fresh start there would overwrite them and mix two runs' metrics.
- `--resume DIR`: that checkpoint; into an output dir that holds another run only with --force.
- `--resume none`, or auto with nothing to resume: a fresh run, refused when the dir already holds
  checkpoints, final/ or metrics.jsonl, unless --force (which removes them first).
"""
from __future__ import annotations

from pathlib import Path

from megads.checkpoint import store
from megads.runtime.rundir import RunDirError, clear_previous_run, previous_run


def plan_run(output_dir: str, resume: str, force: bool) -> tuple[Path | None, list[str]]:
    """(checkpoint to resume or None, notes to log). Raises RunDirError/CheckpointError."""
    from megads.errors import CheckpointError

    notes: list[str] = []
    root = store.checkpoint_root(output_dir)
    path = None
    if resume in (None, "", "none"):
        pass
    elif resume == "auto":
        dirs = store.step_dirs(output_dir)
        complete = [d for _, d, ok in dirs if ok]
        partial = [d.name for _, d, ok in dirs if not ok] + sorted(p.name for p in root.glob(".tmp-step-*"))
        if complete:
            path = complete[-1]
            newer = [d.name for s, d, ok in dirs if not ok and s > int(path.name.split("-")[1])]
            if newer:
                notes.append(f"resume: skipping incomplete {', '.join(newer)} (no COMPLETE marker)")
        elif partial:
            raise CheckpointError(
                f"{root}: no complete checkpoint to resume from ({', '.join(partial)} lack COMPLETE: a save that "
                f"did not finish); resume from a good copy with --resume DIR, or start over with --resume none "
                f"--force (which removes them)")
    else:
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        if not (path / "COMPLETE").is_file():
            raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no COMPLETE marker)")
        if path.resolve().parent == root.resolve():
            return path, notes
    if path is not None and path.resolve().parent == root.resolve():
        return path, notes
    held = previous_run(output_dir)
    if held and not force:
        what = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        action = "start from another run's checkpoint" if path is not None else "start a fresh run"
        raise RunDirError(f"{output_dir}: already holds a run ({what}); refusing to {action} over it: resume it "
                          f"with --resume auto, choose another train.output_dir, or pass --force to replace it")
    if held:
        clear_previous_run(output_dir)
        notes.append(f"--force: removed the previous run's {', '.join(held)} from {output_dir}")
    return path, notes
