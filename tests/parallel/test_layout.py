"""Rank layout arithmetic (Megatron order, experts folded over TP x DP) and size errors."""
import pytest

from megads.errors import ConfigError
from megads.parallel.state import Layout


def test_megatron_order_tp_adjacent_then_dp_then_pp():
    lay = Layout(world=8, tp=2, pp=2, ep=2)
    g = lay.groups()
    assert lay.dp == 2 and lay.edp == 2
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(g["pp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.coords(5) == dict(tp=1, dp=0, pp=1, ep=1, edp=0)
    assert g["embed"] == [[0, 4], [1, 5], [2, 6], [3, 7]]  # the tied embedding's first/last-stage copies


def test_every_rank_in_exactly_one_group_of_each_kind():
    for world, tp, pp, ep in [(4, 1, 1, 2), (4, 2, 1, 4), (8, 2, 1, 4), (12, 2, 2, 3), (6, 1, 1, 6)]:
        lay = Layout(world, tp, pp, ep)
        for kind, groups in lay.groups().items():
            if kind == "embed":  # only the first and last pipeline stages hold the embedding
                stage = tp * lay.dp
                assert groups == ([[r, (pp - 1) * stage + r] for r in range(stage)] if pp > 1 else [])
                continue
            flat = sorted(r for grp in groups for r in grp)
            assert flat == list(range(world)), (kind, world, tp, pp, ep)
        assert lay.tp * lay.dp * lay.pp == world
        assert lay.ep * lay.edp == lay.tp * lay.dp


@pytest.mark.parametrize("world,tp,pp,ep,key", [(3, 2, 1, 1, "world size 3"), (4, 1, 1, 3, "parallel.ep"),
                                                 (6, 4, 1, 1, "tp*pp")])
def test_sizes_that_do_not_divide_are_rejected(world, tp, pp, ep, key):
    with pytest.raises(ConfigError, match=key.replace("*", r"\*")):
        Layout(world, tp, pp, ep)


def test_bad_layout_rejected_on_rank0_and_every_rank_exits_2(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(root))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megads", "train", "configs/tiny.yaml", "--set", "parallel.ep=4",
             "--set", "model.n_routed_experts=8", "--set", f"train.output_dir={tmp_path}",
             "--set", "data.builtin_corpus=false", "--set", "data.paths=[x]"],
            cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "parallel.ep: 4 must divide" in outs[0][1]
    assert "megads: error" not in outs[1][1]
    assert "Traceback" not in outs[0][1] + outs[1][1]
