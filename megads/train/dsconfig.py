"""The DeepSpeed JSON of a run: generated from the YAML's train/parallel sections, or the user's
own (`train.deepspeed_config`) with megads's batch facts checked against it."""
from __future__ import annotations

import json
from pathlib import Path

from megads.config import Config
from megads.errors import ConfigError


def deepspeed_config(cfg: Config, dp: int, precision: str | None = None) -> dict:
    """The DeepSpeed JSON generated from the YAML (or the user's own, with our batch facts).
    precision: fp32 | bf16, what `train.precision` resolved to (megads.runtime.precision)."""
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} must be a multiple of "
                          f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": (precision or t.precision) == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        try:
            user = json.loads(Path(t.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{t.deepspeed_config}:{e.lineno}: invalid JSON ({e.msg})") from None
        for k in ("optimizer", "scheduler"):
            if k in user:
                raise ConfigError(f"{t.deepspeed_config}: key {k!r} is not supported: megads builds the "
                                  f"optimizer and schedule from the train section")
        ds.update(user)
        mb, gb = ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]
        if gb != mb * ds["gradient_accumulation_steps"] * dp:
            raise ConfigError(f"{t.deepspeed_config}: train_batch_size {gb} != micro {mb} x accumulation "
                              f"{ds['gradient_accumulation_steps']} x data-parallel {dp}")
        t.micro_batch_size, t.global_batch_size = mb, gb
    return ds
