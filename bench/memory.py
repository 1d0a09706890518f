"""Peak memory of building the model, per rank: shard by shard (meta device + seeded init, what
the trainer does) against full construction (every rank builds the whole model, then keeps its
shards: what megads did before), for a ~0.5B-parameter MoE under one process, EP2 and PP2.

Each rank is a fresh process that builds its part and reports its peak RSS (ru_maxrss) and the
parameters it holds; nothing else (no optimizer, no DeepSpeed), so the figure is the build's.

    python bench/memory.py
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ~0.5B parameters: 12 blocks (1 dense), 24 routed experts of 512 + 1 shared, hidden 1024, vocab 32k
MODEL = ["model.preset=small", "model.vocab_size=32768", "model.hidden_size=1024", "model.num_layers=12",
         "model.first_k_dense=1", "model.num_heads=8", "model.intermediate_size=2816",
         "model.moe_intermediate_size=512", "model.n_routed_experts=24", "model.num_experts_per_tok=4",
         "model.n_group=4", "model.topk_group=2", "model.n_shared_experts=1", "model.mtp_depth=0"]
LAYOUTS = {"one process": (1, []), "EP2": (2, ["parallel.ep=2"]), "PP2": (2, ["parallel.pp=2"])}


def worker(method: str, out: str, sets: list[str]) -> None:
    import resource

    import torch

    from megads.config import load_config
    from megads.parallel import pipeline
    from megads.parallel import state as pstate
    from megads.train.init import build_local

    cfg = load_config(None, sets)
    pstate.init_distributed("gloo", 600)
    p = cfg.parallel
    ps = pstate.initialize(p.tp, p.pp, p.ep)
    plan = pipeline.plan(cfg, ps.pp_rank) if p.pp > 1 else None
    torch.manual_seed(cfg.train.seed)
    if method == "sharded":
        model = build_local(cfg, ps, plan)
    else:  # the whole model on every rank, then this rank's shards copied out of it
        from megads.model import Transformer
        from megads.parallel import build_model_par
        from megads.parallel.shard import load_full_state

        full = Transformer(cfg.model)
        part = dict(layers=plan.layer_ids, embed=plan.embed, head=plan.last) if plan is not None else {}
        par = build_model_par(cfg, ps) if ps.layout.ep > 1 or ps.layout.tp > 1 else None
        model = Transformer(cfg.model, par=par, **part)
        load_full_state(model, full.state_dict(), ps)
        del full
    n = sum(t.numel() for t in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = torch.distributed.get_rank()
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps({"params": n, "peak_rss_mb": rss}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, method: str, sets: list[str]) -> list[dict]:
    out = Path(f"/tmp/megads_bench_memory_{method}_{world}")
    port = _port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", method, str(out), *sets], env=env))
    assert [q.wait(timeout=3600) for q in procs] == [0] * world
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(world)]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    from megads.config import load_config
    from megads.model.info import model_info

    total = model_info(load_config(None, MODEL).model)["total_params"]
    print(f"model: {total / 1e9:.3f}B parameters (fp32: {total * 4 / 1e9:.2f} GB), build only, peak RSS per rank\n")
    print("| layout | construction | parameters per rank | peak RSS per rank (MB) |")
    print("|---|---|---|---|")
    for name, (world, extra) in LAYOUTS.items():
        for method in ("sharded", "full"):
            if world == 1 and method == "full":
                continue  # one process: both are the whole model
            got = run(world, method, MODEL + extra)
            params = ", ".join(f"{g['params'] / 1e6:.0f}M" for g in got)
            rss = ", ".join(f"{g['peak_rss_mb']:,.0f}" for g in got)
            what = "meta device + seeded init (this rank's part)" if method == "sharded" else \
                "whole model, then its shards (before)"
            print(f"| {name} | {what} | {params} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
