"""Config loading, presets, `megads model-info`, and the user-facing errors of bad configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megads.cli import main
from megads.config import (PRESET_DIR, Config, ConfigError, ModelConfig, load_config, load_model_preset,
                           model_config_from_dict)
from megads.model.info import model_info

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["tiny", "small", "gpu-1b", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m megads ARGS` in a fresh interpreter, as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megads", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def cli_json(capsys, *args: str) -> dict:
    assert main(["model-info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_model_preset(name)
    assert isinstance(cfg, ModelConfig)
    cfg.validate()
    assert cfg.qk_head_dim in (0, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    # the same through load_config (a bare preset name and the preset file)
    assert load_config(name).model == cfg
    assert load_config(PRESET_DIR / f"{name}.yaml").model == cfg


def test_every_preset_file_is_listed():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(PRESETS)


def test_published_shapes():
    v3 = load_model_preset("deepseek-v3")
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert (v3.score_func, v3.route_scale, v3.kv_lora_rank, v3.qk_rope_head_dim) == ("sigmoid", 2.5, 512, 64)
    v2 = load_model_preset("deepseek-v2")
    assert (v2.score_func, v2.route_scale, v2.n_routed_experts, v2.num_experts_per_tok) == ("softmax", 16.0, 160, 6)


def test_run_config_composes_sections():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert isinstance(cfg, Config)
    assert cfg.model == load_model_preset("tiny")
    assert cfg.parallel.zero_stage == 1 and cfg.train.max_steps == 300 and cfg.data.split == "98,2"


def test_run_config_with_preset_and_field_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  preset: tiny\n  num_layers: 2\nparallel:\n  tp: 2\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(p)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == load_model_preset("tiny").hidden_size
    assert cfg.parallel.tp == 2 and cfg.train.lr == 1e-4


def test_set_overrides_every_section():
    cfg = load_config("tiny", ["model.hidden_size=128", "model.score_func=softmax", "parallel.tp=2",
                               "parallel.sequence_parallel=true", "train.lr=0.01", "train.output_dir=runs/x",
                               "data.split=90,10", "data.paths=[a, b]"])
    assert cfg.model.hidden_size == 128 and cfg.model.score_func == "softmax"
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.train.lr == 0.01 and cfg.train.output_dir == "runs/x"
    assert cfg.data.split == "90,10" and cfg.data.paths == ["a", "b"]
    # a later --set wins; model.preset swaps the whole model section
    assert load_config("tiny", ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2
    assert load_config(None, ["model.preset=small"]).model == load_model_preset("small")
    # no file at all: defaults
    assert load_config(None).model == ModelConfig()


def test_set_override_through_the_cli(capsys):
    base = cli_json(capsys, "tiny")
    fewer = cli_json(capsys, "tiny", "--set", "model.num_layers=2")
    assert fewer["total_params"] < base["total_params"]
    assert fewer["kv_cache_bytes_per_token"] * 2 == base["kv_cache_bytes_per_token"]
    f32 = cli_json(capsys, "tiny", "--set", "model.cache_dtype=float32")
    assert f32["kv_cache_bytes_per_token"] == 2 * base["kv_cache_bytes_per_token"]


def test_qk_head_dim_derived_or_consistent():
    assert model_config_from_dict({"qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "qk_head_dim": 48}).head_dim_qk == 48
    with pytest.raises(ConfigError, match="qk_head_dim"):
        model_config_from_dict({"qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "qk_head_dim": 40})


# ----------------------------------------------------------------------------- model-info

def test_model_info_deepseek_v3_json():
    r = run_cli("model-info", "deepseek-v3", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("total_params", "active_params", "flops_per_token", "kv_cache_bytes_per_token"):
        assert key in info
    assert info["total_params"] == pytest.approx(671e9, rel=0.01)
    assert info["active_params"] == pytest.approx(37e9, rel=0.03)
    assert info["kv_cache_bytes_per_token"] == 576 * 61 * 2  # latent + rope key, 61 layers, bf16
    # training FLOPs ~ 6 x active matmul weights plus attention
    assert 6 * 30e9 < info["flops_per_token"] < 6 * 60e9


def test_model_info_deepseek_v2(capsys):
    info = cli_json(capsys, "deepseek-v2")
    assert info["total_params"] == pytest.approx(236e9, rel=0.01)
    assert info["active_params"] == pytest.approx(21e9, rel=0.03)
    assert info["kv_cache_bytes_per_token"] == 576 * 60 * 2


def test_model_info_small_presets(capsys):
    tiny, small = cli_json(capsys, "tiny"), cli_json(capsys, "small")
    assert 5e6 <= tiny["total_params"] <= 15e6
    assert 40e6 <= small["total_params"] <= 60e6
    for info in (tiny, small):
        assert info["active_params"] < info["total_params"]
    lite_cfg = load_model_preset("deepseek-v2-lite")
    lite = model_info(lite_cfg)
    assert lite["total_params"] == pytest.approx(15.7e9, rel=0.03)
    # the published 2.4B activated leaves out the input embedding; model-info counts it
    assert lite["active_params"] - lite_cfg.vocab_size * lite_cfg.hidden_size == pytest.approx(2.4e9, rel=0.03)
    # the text form names the figures
    assert main(["model-info", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "total parameters" in text and "KV cache" in text


def test_model_info_total_params_match_a_built_model():
    import torch

    from megads.model.transformer import Transformer

    cfg = load_model_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert model_info(cfg)["total_params"] == n
    cfg_mtp = load_config("tiny", ["model.mtp_depth=1", "model.num_layers=2"]).model
    model = Transformer(cfg_mtp)
    info = model_info(cfg_mtp)
    assert info["total_params"] + info["mtp_params"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- bad configs

BAD = {
    "topk_group": ("model:\n  preset: tiny\n  n_group: 2\n  topk_group: 3\n", "topk_group"),
    "divisible": ("model:\n  preset: tiny\n  n_routed_experts: 6\n  n_group: 4\n  topk_group: 1\n",
                  "n_routed_experts"),
    "too_many_k": ("model:\n  preset: tiny\n  num_experts_per_tok: 9\n", "num_experts_per_tok"),
    "qk_head_dim": ("model:\n  preset: tiny\n  qk_head_dim: 50\n", "qk_head_dim"),
    "unknown_key": ("model:\n  preset: tiny\n  hidden_sise: 64\n", "hidden_sise"),
    "unknown_section": ("modle:\n  hidden_size: 64\ntrain:\n  lr: 0.1\n", "modle"),
    "wrong_type": ("model:\n  hidden_size: abc\n", "hidden_size"),
    "wrong_bool": ("model:\n  norm_topk_prob: maybe\n", "norm_topk_prob"),
    "odd_rope": ("model:\n  qk_rope_head_dim: 7\n", "qk_rope_head_dim"),
    "negative": ("train:\n  lr: -1\n", "lr"),
    # the fixed-shape decode step needs the whole MLA model in each process (megads.model.static)
    "decode_tp": ("model:\n  preset: tiny\nparallel:\n  tp: 2\ngrpo:\n  rollout_decode: compile\n",
                  "grpo.rollout_decode: compile needs the whole MLA model in each process, not parallel.tp > 1"),
    "decode_ep": ("model:\n  preset: tiny\nparallel:\n  ep: 2\ngrpo:\n  rollout_decode: static\n",
                  "not parallel.ep > 1"),
    "decode_mha": ("model:\n  preset: tiny\n  attention: mha\ngrpo:\n  rollout_decode: static\n",
                   "not model.attention mha"),
}


def test_rollout_decode_graph_needs_cuda():
    if torch.cuda.is_available():
        assert load_config("tiny", ["grpo.rollout_decode=graph"]).grpo.rollout_decode == "graph"
    else:
        with pytest.raises(ConfigError, match="grpo.rollout_decode: graph needs CUDA"):
            load_config("tiny", ["grpo.rollout_decode=graph"])
    assert load_config("tiny", ["grpo.rollout_decode=static"]).grpo.rollout_decode == "static"


def _check_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_exit_2(case, tmp_path, capsys):
    text, key = BAD[case]
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    code = main(["model-info", str(p)])
    _check_user_error(code, capsys.readouterr().err, key)
    with pytest.raises(ConfigError, match=key):
        load_config(p)


@pytest.mark.parametrize("args, key", [
    (["--set", "model.topk_group=4"], "topk_group"),
    (["--set", "model.n_routed_experts=7"], "n_routed_experts"),
    (["--set", "model.num_experts_per_tok=9"], "num_experts_per_tok"),
    (["--set", "model.qk_head_dim=10"], "qk_head_dim"),
    (["--set", "model.no_such_key=1"], "no_such_key"),
    (["--set", "model.num_layers=two"], "num_layers"),
    (["--set", "nosection.x=1"], "nosection"),
    (["--set", "train.lr"], "train.lr"),
    (["--set", "parallel.tp=3"], "tp"),
])
def test_bad_set_override_is_one_line_exit_2(args, key, capsys):
    code = main(["model-info", "tiny", *args])
    _check_user_error(code, capsys.readouterr().err, key)


def test_missing_file_and_unknown_preset(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    _check_user_error(main(["model-info", str(missing)]), capsys.readouterr().err, "nope.yaml", "not found")
    with pytest.raises(ConfigError, match="not found"):
        load_model_preset("no-such-preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing)


def test_yaml_syntax_error_names_file_and_line_in_a_real_process(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  hidden_size: 64\n  num_heads: [4\ntrain:\n  lr: 0.1\n")
    r = run_cli("model-info", str(p))
    _check_user_error(r.returncode, r.stderr, "broken.yaml")
    assert r.stdout == ""
    line = r.stderr.split("broken.yaml", 1)[1]
    assert line.startswith(":") and line[1].isdigit()  # file:line
    assert 3 <= int(line[1:].split(":")[0]) <= 5


def test_a_bare_string_is_a_list_of_one_and_stage_sections():
    cfg = load_config(None, ["data.paths=x.jsonl", "train.stage=sft", "sft.loss_on=all", "dpo.loss_type=ipo"])
    assert cfg.data.paths == ["x.jsonl"] and cfg.train.stage == "sft" and cfg.sft.loss_on == "all"
    for bad, key in (["train.stage=rl"], "train.stage"), (["dpo.loss_type=kto"], "dpo.loss_type"), \
            (["train.stage=distill"], "distill.teacher"), (["distill.loss=l2"], "distill.loss"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad)
