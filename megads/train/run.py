"""`megads train`: one process of a (possibly multi-rank) training run, from start to exit."""
from __future__ import annotations

import logging

import torch.distributed as dist

from megads.config import load_config
from megads.errors import MegadsError
from megads.parallel import state as pstate
from megads.runtime.signals import GracefulStop
from megads.train.loop import Trainer

log = logging.getLogger(__name__)


def run_training(config_path, overrides, resume: str = "auto", force: bool = False) -> int:
    """`megads train`: start torch.distributed from the launcher's environment, watch the other
    ranks' heartbeats (a lost rank ends every survivor within parallel.timeout_s with a message
    naming it, instead of a hang), train, and leave together."""
    from megads.parallel import faults

    cfg = load_config(config_path, overrides)
    pstate.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    stop = GracefulStop(cfg.train.save_on_signal, announce=(dist.get_rank() if dist.is_initialized() else 0) == 0)
    watchdog = faults.start_watchdog(cfg.parallel.timeout_s)  # None in a world of one
    try:
        trainer = Trainer(cfg, resume=resume, force=force, stop=stop if cfg.train.save_on_signal else None)
        code = trainer.train()
        faults.stop_watchdog(watchdog, barrier=True)  # no rank leaves while another still watches
        watchdog = None
        return code
    except MegadsError:
        raise
    except Exception as e:
        msg = faults.describe_collective_error(e) if dist.is_initialized() and dist.get_world_size() > 1 else None
        if msg is None:
            raise
        log.debug("collective failed", exc_info=True)
        faults.fail(msg)  # exits hard: the process group cannot be torn down cleanly now
        raise  # unreachable
    finally:
        stop.restore()
        faults.stop_watchdog(watchdog)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
