"""Built shard by shard: every rank allocates only its part (its pipeline stages, TP slices and
routed experts) on the meta device and fills it with the layout-independent seeded init; each
tensor must equal, bit for bit, the same slice of the single-process initialisation."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megads.config import load_config
from megads.model.init import normal_slice, seeded_init_
from megads.parallel import state as pstate
from test_equivalence import ROOT, _port, rank_env

WORKER = Path(__file__).with_name("build_worker.py")
TINY = ["model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=128",
        "model.moe_intermediate_size=32", "model.num_layers=4", "model.first_k_dense=1", "model.num_heads=4",
        "model.kv_lora_rank=32", "model.q_lora_rank=24", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
        "model.v_head_dim=16", "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.n_group=2",
        "model.topk_group=1", "model.n_shared_experts=1", "model.max_seq_len=64", "train.seq_len=16",
        "train.seed=5"]


def _full(sets):
    from megads.train.init import build_local

    cfg = load_config(None, TINY + sets)
    return build_local(cfg, pstate.initialize(1, 1, 1)).state_dict()


def _run(world, sets, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    procs = []
    for r in range(world):
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)] + TINY + sets, env=rank_env(r, world, port),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT)))
    for p in procs:
        text = p.communicate(timeout=120)[0].decode(errors="replace")
        assert p.returncode == 0, text[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _expected_slice(full: torch.Tensor, local: torch.Tensor, name: str, got: dict) -> torch.Tensor:
    """The slice of the full tensor this rank should hold, from shapes and coordinates alone:
    routed experts split dim 0 over EP, every other split tensor is a TP shard."""
    if full.shape == local.shape:
        return full
    dims = [d for d in range(full.dim()) if full.shape[d] != local.shape[d]]
    assert len(dims) == 1, (name, full.shape, local.shape)
    d = dims[0]
    expert = ".experts." in name
    n = got["ep"] if expert else got["tp"]
    r = got["coords"]["ep"] if expert else got["coords"]["tp"]
    assert full.shape[d] == n * local.shape[d], (name, full.shape, local.shape, n)
    return full.narrow(d, r * local.shape[d], local.shape[d])


LAYOUTS = {
    # world, overrides
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "pp2_ep2_mtp": (4, ["parallel.pp=2", "parallel.ep=2", "model.mtp_depth=1"]),
    "pp2_tp2_vpp2_tied": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=interleaved",
                              "parallel.vpp=2", "model.tie_embeddings=true"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_rank_holds_the_single_process_slice(name, tmp_path):
    world, sets = LAYOUTS[name]
    full = _full([s for s in sets if not s.startswith("parallel.")])
    ranks = _run(world, sets, tmp_path)
    seen = set()
    for got in ranks:
        for k, t in got["state"].items():
            assert k in full, k
            want = _expected_slice(full[k], t, k, got)
            assert torch.equal(t, want), f"{name}: {k} on {got['coords']}"
            seen.add(k)
    assert seen == set(full), set(full) ^ seen  # every tensor lives somewhere
    if "parallel.pp=2" in sets:  # only its part: no rank holds every block
        per_rank = [sum(t.numel() for t in g["state"].values()) for g in ranks]
        assert max(per_rank) < sum(t.numel() for t in full.values())
        for g in ranks:
            blocks = {k.split(".")[1] for k in g["state"] if k.startswith("layers.")}
            assert 0 < len(blocks) < 4, blocks


def test_seeded_init_statistics_and_blocks():
    """std per parameter kind, norms at one, distinct streams per name, and a block-crossing slice
    equal to the same rows of the whole tensor."""
    from megads.model import Transformer
    from megads.model.init import materialize

    cfg = load_config(None, TINY).model
    with torch.device("meta"):
        m = Transformer(cfg)
    materialize(m, "cpu")
    seeded_init_(m, 3)
    sd = m.state_dict()
    assert torch.equal(sd["norm.weight"], torch.ones_like(sd["norm.weight"]))
    assert abs(sd["embed.weight"].std().item() - cfg.init_std) < 0.1 * cfg.init_std
    w2 = sd["layers.1.ffn.experts.w2"]
    assert abs(w2.std().item() - cfg.init_std / (2 * cfg.num_layers) ** 0.5) < 0.1 * w2.std().item()
    assert not torch.equal(sd["layers.1.ffn.experts.w1"], sd["layers.1.ffn.experts.w3"])
    assert torch.equal(sd["layers.1.ffn.gate.bias"], torch.zeros_like(sd["layers.1.ffn.gate.bias"]))
    # a tensor of many blocks: any row range equals those rows of the whole, any column range too
    whole = normal_slice(9, "x", (3000, 1000), 0.5)
    assert torch.equal(normal_slice(9, "x", (3000, 1000), 0.5, 0, 1000, 1100), whole[1000:2100])
    assert torch.equal(normal_slice(9, "x", (3000, 1000), 0.5, 1, 250, 500), whole[:, 250:750])
    assert abs(whole.std().item() - 0.5) < 0.01
