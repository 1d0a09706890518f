"""`megads checkpoint inspect DIR`: what a training checkpoint holds, without loading it.

The step, data position, run id and the layout that wrote it (trainer_state.pt), then every
tensor of the sharded (DCP) state with its full shape, dtype, size and the number of pieces it is
stored in (one per shard that wrote it: a TP2 weight in 2 pieces, a replicated one in 1).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from megads.checkpoint import manifest as mf
from megads.checkpoint import store
from megads.errors import CheckpointError


def resolve(path: str) -> Path:
    """A step-N dir, or the newest complete checkpoint of a run dir / checkpoints dir."""
    d = Path(path)
    if (d / "trainer_state.pt").is_file() or (d / ".metadata").is_file():
        return d
    out = d.parent if d.name == "checkpoints" else d
    found = store.list_checkpoints(str(out))
    if not found:
        raise CheckpointError(f"{path}: no checkpoint here (expected a step-N dir, a checkpoints/ dir or a run dir)")
    return found[-1]


_SIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


def summary(path: str) -> dict:
    """{dir, step, run_id, complete, layout, parallel, stage, consumed_samples, files, bytes,
    tensors: [(key, dtype, shape, pieces, bytes)]}."""
    d = resolve(path)
    f = d / "trainer_state.pt"
    try:
        st = torch.load(f, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (an incomplete checkpoint?)") from None
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__})") from None
    files = mf.list_files(d)
    out = {"dir": str(d), "step": st.get("step"), "run_id": st.get("run_id"), "complete": (d / mf.COMPLETE).is_file(),
           "layout": st.get("layout"), "parallel": (st.get("config") or {}).get("parallel", {}),
           "stage": ((st.get("config") or {}).get("train") or {}).get("stage", "pretrain"),
           "consumed_samples": st.get("consumed_samples"), "lr": st.get("lr"), "format": st.get("format"),
           "files": len(files), "bytes": sum((d / n).stat().st_size for n in files), "tensors": []}
    if not store.is_sharded(d):
        out["format"] = out["format"] or "deepspeed (older megads, per layout)"
        return out
    from megads.checkpoint import sharded

    try:
        entries = sharded.describe(d)
    except Exception as e:
        raise CheckpointError(f"{d / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
    for key, dtype, shape, pieces in entries:
        n = math.prod(shape) if shape else (1 if dtype != "object" else 0)
        out["tensors"].append((key, dtype, list(shape), pieces, n * _SIZE.get(dtype, 4)))
    return out


def render(s: dict, prefix: str = "") -> list[str]:
    lay = s["layout"] or {}
    par = s["parallel"] or {}
    lines = [f"{s['dir']}: step {s['step']} ({s['stage']}), run {s['run_id']}, "
             f"{'complete' if s['complete'] else 'NOT complete'}, format {s['format']}",
             f"  written by: world {lay.get('world')} = tp {lay.get('tp')} x pp {lay.get('pp')} x dp {lay.get('dp')}, "
             f"ep {lay.get('ep')}, zero_stage {par.get('zero_stage')}, pp_schedule {par.get('pp_schedule', '1f1b')}"
             f" (vpp {par.get('vpp', 1)}); resumable under any layout",
             f"  data position: {s['consumed_samples']} samples consumed; next lr {s['lr']}",
             f"  {s['files']} files, {s['bytes'] / 1e6:.2f} MB"]
    rows = [t for t in s["tensors"] if t[0].startswith(prefix)]
    groups: dict = {}
    for key, _, shape, _, nbytes in rows:
        g = key.split(".")[0] if not key.startswith("optim.") else ".".join(key.split(".")[:2])
        n, b = groups.get(g, (0, 0))
        groups[g] = (n + 1, b + nbytes)
    for g, (n, b) in sorted(groups.items()):
        lines.append(f"  {g + '.*':<22} {n:>6} entries {b / 1e6:>10.2f} MB")
    width = max([len(t[0]) for t in rows] + [10])
    for key, dtype, shape, pieces, nbytes in rows:
        dims = "x".join(str(x) for x in shape) if shape else "-"
        lines.append(f"  {key:<{width}}  {dtype:<8} {dims:>16}  {pieces} piece{'s' if pieces != 1 else ' '} "
                     f"{nbytes / 1e6:>9.3f} MB")
    return lines
