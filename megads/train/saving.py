"""The trainer's checkpoints: what goes in, when it completes, and loading one in any layout.

megads.checkpoint does the writing (atomic, verified, sharded with torch.distributed.checkpoint);
this is the trainer's side: the sharded state of its model and optimizer, the trainer state (step,
data position, run id, config, layout), each rank's RNG streams and its objective's extra state;
with `train.async_save` the save in flight, completed at the next save, at the end of the run or
on a signal.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from megads.checkpoint import sharded
from megads.checkpoint import store as ckpt
from megads.train.optim import lr_at


class Saver:
    def __init__(self, trainer):
        self.tr = trainer
        self.pending: ckpt.PendingSave | None = None  # an asynchronous save in flight
        async_ = trainer.cfg.train.async_save and dist.is_initialized()
        # the background thread's collectives need a group of their own (gloo: CPU tensors)
        self.group = dist.new_group(backend="gloo") if async_ else None
        self.save_seconds = self.load_seconds = 0.0  # what training last waited for

    def ds_optimizer(self):
        """DeepSpeed's optimizer when it keeps the fp32 master and moments in flat partitions
        (ZeRO-1/2, bf16), else None (the guarded AdamW holds them per parameter)."""
        tr = self.tr
        if any(hasattr(p, "_hp_mapping") for p in tr.model.parameters()):
            return tr.engine.optimizer
        return None

    def load(self, path: Path, same_layout: bool):
        """Collective: the model and optimizer state of `path` (any layout), this rank's RNG
        streams where the same layout wrote it; returns the objective's extra state or None."""
        tr = self.tr
        t0 = time.perf_counter()
        extra = ckpt.load_checkpoint(path, tr.model, tr.optimizer, self.ds_optimizer(), tr.ps, same_layout)
        self.load_seconds = time.perf_counter() - t0
        return extra

    def save(self, wait: bool = False) -> Path:
        """Collective: a checkpoint of this step. With train.async_save the files are written in
        the background and the checkpoint completes later (`wait`: complete it now)."""
        tr = self.tr
        self.finish()
        t = tr.cfg.train
        extra = tr.objective.checkpoint_extra()
        state = {"step": tr.step, "bad_steps_total": tr.bad_total, "run_id": tr.run_id,
                 "consumed_samples": tr.step * t.global_batch_size, "lr": lr_at(tr.step, t),
                 "layout": dict(vars(tr.ps.layout)), "config": tr.cfg.to_dict(), "format": ckpt.FORMAT,
                 "has_extra": any(_all_ranks(extra is not None))}
        if tr.stop is not None:
            tr.stop.saving = True  # (only the wording of a second signal's abort line)
        try:
            t0 = time.perf_counter()
            shards = sharded.state_for_save(tr.model, tr.optimizer, self.ds_optimizer(), tr.ps,
                                            {"rng": ckpt.rng_state(), "extra": extra})
            out = ckpt.save_checkpoint(shards, t.output_dir, tr.step, state, t.keep_last,
                                       async_group=None if wait else self.group)
            self.save_seconds = time.perf_counter() - t0
            if isinstance(out, ckpt.PendingSave):
                self.pending = out
                return out.final
            return out
        finally:
            if tr.stop is not None:
                tr.stop.saving = False

    def finish(self) -> Path | None:
        """Collective: complete the asynchronous save in flight, if any."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        return ckpt.finish_save(pending)


def _all_ranks(flag: bool) -> list[bool]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [flag]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, flag)
    return out
