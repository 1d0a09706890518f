"""Pipeline stages without processes: the split of the blocks, the placement of stages on ranks
for each schedule, what each rank builds, and the config errors (one line naming the key)."""
import pytest

from megads.config import ConfigError, load_config
from megads.parallel.pipeline import plan, rank_stages, split_layers, stage_rank


def test_even_split_gives_the_remainder_to_the_first_stages():
    assert split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(5, 2, [1, 4]) == [[0], [1, 2, 3, 4]]


@pytest.mark.parametrize("schedule,pp,vpp,want", [
    ("1f1b", 4, 1, {0: [0], 1: [1], 2: [2], 3: [3]}),
    ("interleaved", 2, 2, {0: [0, 2], 1: [1, 3]}),  # Megatron's virtual pipeline: stage s on rank s % pp
    ("zbv", 2, 2, {0: [0, 3], 1: [1, 2]}),  # V: rank r holds stages r and 2pp-1-r
    ("dualpipev", 4, 2, {0: [0, 7], 1: [1, 6], 2: [2, 5], 3: [3, 4]}),
])
def test_stage_placement(schedule, pp, vpp, want):
    got = {r: rank_stages(schedule, pp, vpp, r) for r in range(pp)}
    assert got == want
    for r, stages in want.items():
        assert all(stage_rank(schedule, pp, s) == r for s in stages)


def test_first_and_last_stage_hold_embedding_head_and_mtp():
    cfg = load_config("tiny", ["parallel.pp=2", "model.num_layers=4", "model.mtp_depth=1"])
    first, last = plan(cfg, 0), plan(cfg, 1)
    assert first.layer_ids == [0, 1] and last.layer_ids == [2, 3]
    assert first.embed and not first.last and not first.embed_copy
    assert last.last and last.embed and last.embed_copy and last.tied_across_ranks  # MTP reads the embedding
    v = load_config("tiny", ["parallel.pp=2", "model.num_layers=4", "parallel.pp_schedule=dualpipev",
                             "parallel.vpp=2", "model.mtp_depth=1"])
    r0 = plan(v, 0)
    assert r0.stages == [0, 3] and r0.first and r0.last and not r0.embed_copy and not r0.tied_across_ranks


@pytest.mark.parametrize("sets,key", [
    (["parallel.pp=2", "parallel.pp_schedule=gpipe"], "pp_schedule"),
    (["parallel.pp=2", "parallel.vpp=2"], "vpp"),  # 1f1b has one stage per rank
    (["parallel.pp=2", "parallel.pp_schedule=zbv"], "vpp"),  # V schedules: two stages per rank
    (["parallel.pp=2", "parallel.pp_layers=[1,1]", "model.num_layers=3"], "pp_layers"),
    (["parallel.pp=2", "parallel.pp_layers=[3]", "model.num_layers=3"], "pp_layers"),
    (["parallel.pp=2", "parallel.pp_layers=[0,3]", "model.num_layers=3"], "pp_layers"),
    (["parallel.pp=4", "model.num_layers=3"], "parallel.pp"),
    (["parallel.pp=2", "parallel.zero_stage=2"], "zero_stage"),
    (["parallel.pp=2", "train.stage=grpo"], "train.stage"),
])
def test_bad_pipeline_config_names_the_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config("tiny", sets)
    assert "\n" not in str(e.value)


def test_grpo_refusal_says_why():
    with pytest.raises(ConfigError, match="rollouts under pipeline parallelism"):
        load_config("tiny", ["parallel.pp=2", "train.stage=grpo"])
