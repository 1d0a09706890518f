"""May this checkpoint be resumed under the current config? The saved config against the new one.

Four kinds of key:

- `FREE`: how long to run and how to report it. They may change on resume and are logged:
  train.max_steps (the cosine schedule's length follows it), save/eval/log intervals, keep_last,
  eval_iters, output_dir, TensorBoard/progress/samples, max_bad_steps, save_on_signal,
  verify_on_resume, activation_checkpointing and micro_batch_size (same maths, other memory use;
  the global batch is what counts), parallel.timeout_s and parallel.backend, data.num_workers, data.cache_dir and data.on_error.
- `LAYOUT`: the process layout (tp, pp, ep, zero_stage, the pipeline schedule and split, sequence
  parallelism, the number of ranks): a sharded (DCP) checkpoint is read in any layout, so they may
  change and are logged (a reshard). A checkpoint in the old per-layout format refuses them.
- `model.*` and train.precision: the checkpoint's tensors cannot mean the same thing under another
  value. Never allowed.
- Everything else (lr and schedule shape, optimiser settings, batch size, sequence length, seed,
  data): a resumed run would no longer continue the same run. Refused unless `--force`, which
  logs each change.
"""
from __future__ import annotations

FREE = {
    "train.max_steps", "train.save_interval", "train.keep_last", "train.eval_interval", "train.eval_iters",
    "train.log_interval", "train.output_dir", "train.tensorboard", "train.progress", "train.samples_at_end",
    "train.sample_tokens", "train.max_bad_steps", "train.save_on_signal", "train.verify_on_resume",
    "train.activation_checkpointing", "train.micro_batch_size", "train.async_save", "train.threads", "train.compile",
    "parallel.timeout_s", "parallel.backend", "data.num_workers", "data.cache_dir", "data.on_error",
}
LAYOUT = {"parallel.tp", "parallel.pp", "parallel.ep", "parallel.zero_stage", "parallel.vpp", "parallel.pp_schedule",
          "parallel.pp_layers", "parallel.sequence_parallel", "parallel.ranks_per_node"}
FIXED_PREFIXES = ("model.",)
FIXED = {"train.precision"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every key present in both nested configs whose value differs."""
    a, b = flatten(old), flatten(new)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def kind(key: str) -> str:
    if key in FREE:
        return "free"
    if key in LAYOUT or key.startswith("layout."):
        return "layout"
    if key in FIXED or key.startswith(FIXED_PREFIXES):
        return "fixed"
    return "run"


def fmt(changes) -> str:
    return ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changes)


def check(saved_cfg: dict, cfg: dict, saved_layout: dict | None, layout: dict, where: str,
          force: bool, reshard: bool = True) -> list[tuple[str, object, object]]:
    """Return the allowed changes (to log); raise CheckpointError for the others, one line.
    reshard: the checkpoint is layout-independent (DCP), so layout changes are allowed."""
    from megads.errors import CheckpointError

    changes = diff(saved_cfg, cfg)
    if saved_layout is not None:
        changes += [(f"layout.{k}", saved_layout[k], layout[k]) for k in sorted(set(saved_layout) & set(layout))
                    if saved_layout[k] != layout[k]]
    fixed = [c for c in changes if kind(c[0]) == "fixed" or (kind(c[0]) == "layout" and not reshard)]
    run = [c for c in changes if kind(c[0]) == "run"]
    msg = None
    if fixed:
        msg = (f"{where}: written with a different model or layout: {fmt(fixed)}; resume with the same values, "
               f"or start a new run in another train.output_dir")
    elif run and not force:
        msg = (f"{where}: written with different training settings: {fmt(run)}; resume with the same values, "
               f"or pass --force to continue with the new ones")
    if msg is not None:
        e = CheckpointError(msg)
        e.every_rank = True  # every rank compares the same two configs
        raise e
    return [c for c in changes if c not in fixed]
