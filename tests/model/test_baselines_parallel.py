"""The comparison baselines under tensor parallelism: a model with MHA attention and the classic
auxiliary balance loss (no bias), trained 3 steps on TP2 with sequence parallelism (2 gloo ranks,
the real Trainer and DeepSpeed engine, through tests/parallel/equiv_worker.py), reproduces the
single process: per-step losses and gradient norms within 1e-5, final weights within 1e-4."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "parallel" / "equiv_worker.py"
BASELINES = ["model.attention=mha", "model.aux_loss_alpha=0.01", "model.router_bias=false",
             "model.seq_aux_alpha=0.0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(world: int, tp: int, out: Path, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   LOCAL_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        log = open(out / f"log{r}", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--tp", str(tp), "--ep", "1", "--zero", "0",
                                       "--out", str(out)] + [a for e in extra for a in ("--set", e)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT)))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * world, (codes, (out / "log0").read_text()[-3000:])
    # With LOCAL_SIZE set (as the DeepSpeed launcher does), DeepSpeed's CPU shared-memory
    # all-reduce op would leave a 69 MB buffer per rank in /dev/shm, named by the port; megads
    # switches it off (megads.parallel.state.without_shm_op)
    shm = Path("/dev/shm")
    if shm.is_dir():
        assert not [f for f in os.listdir(shm) if f.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in f]
    return torch.load(out / "result.pt")


def test_mha_and_aux_loss_tp2_sequence_parallel_match_single_process(tmp_path):
    single = run_layout(1, 1, tmp_path / "single", BASELINES)
    tp2 = run_layout(2, 2, tmp_path / "tp2", BASELINES + ["parallel.sequence_parallel=true"])
    assert len(single["losses"]) == len(tp2["losses"]) == 3
    for a, b in zip(single["losses"], tp2["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), (single["losses"], tp2["losses"])
    for a, b in zip(single["grad_norm"], tp2["grad_norm"]):
        assert abs(a - b) <= 1e-5 * abs(a), (single["grad_norm"], tp2["grad_norm"])
    assert set(tp2["state"]) == set(single["state"])
    assert any(".attn.wqkv." in k for k in single["state"])  # the MHA model, not MLA
    for k, ref in single["state"].items():
        diff = (tp2["state"][k].float() - ref.float()).abs().max().item()
        assert diff <= 1e-4, f"{k}: max abs diff {diff}"
