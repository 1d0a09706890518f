"""Training stages as objectives of the one loop: `train.stage` picks one."""
from __future__ import annotations

from megads.errors import ConfigError
from megads.train.objectives.base import Objective
from megads.train.objectives.distill import DistillObjective
from megads.train.objectives.dpo import DPOObjective
from megads.train.objectives.grpo import GRPOObjective
from megads.train.objectives.pretrain import PretrainObjective
from megads.train.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {"pretrain": PretrainObjective, "sft": SFTObjective, "dpo": DPOObjective, "distill": DistillObjective,
                                         "grpo": GRPOObjective}


def build(cfg, tokenizer=None) -> Objective:
    try:
        cls = OBJECTIVES[cfg.train.stage]
    except KeyError:
        raise ConfigError(f"train.stage: {cfg.train.stage!r} is not one of {', '.join(OBJECTIVES)}") from None
    return cls(cfg, tokenizer)
