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


def test_every_rank_in_exactly_one_group_of_each_kind():
    for world, tp, pp, ep in [(4, 1, 1, 2), (4, 2, 1, 4), (8, 2, 1, 4), (12, 2, 2, 3), (6, 1, 1, 6)]:
        lay = Layout(world, tp, pp, ep)
        for kind, groups in lay.groups().items():
            flat = sorted(r for grp in groups for r in grp)
            assert flat == list(range(world)), (kind, world, tp, pp, ep)
        assert lay.tp * lay.dp * lay.pp == world
        assert lay.ep * lay.edp == lay.tp * lay.dp


@pytest.mark.parametrize("world,tp,pp,ep,key", [(3, 2, 1, 1, "world size 3"), (4, 1, 1, 3, "parallel.ep"),
                                                 (6, 4, 1, 1, "tp*pp")])
def test_sizes_that_do_not_divide_are_rejected(world, tp, pp, ep, key):
    with pytest.raises(ConfigError, match=key.replace("*", r"\*")):
        Layout(world, tp, pp, ep)
