"""One rank of the shard-by-shard build check (run by test_shard_init.py): builds this rank's part
of the model (meta device, then the seeded init) and writes its tensors, coordinates and the peak
RSS of the build to OUT/rank<R>.pt."""
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megads.config import load_config  # noqa: E402
from megads.parallel import pipeline  # noqa: E402
from megads.parallel import state as pstate  # noqa: E402
from megads.train.init import build_local  # noqa: E402


def main():
    out, sets = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, sets)
    pstate.init_distributed("gloo", 60)
    p = cfg.parallel
    ps = pstate.initialize(p.tp, p.pp, p.ep)
    plan = pipeline.plan(cfg, ps.pp_rank) if p.pp > 1 else None
    model = build_local(cfg, ps, plan)
    rank = torch.distributed.get_rank()
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "coords": ps.layout.coords(rank), "ep": p.ep, "tp": p.tp,
                "stages": plan.stages if plan else None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
