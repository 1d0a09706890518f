"""HF DeepSeek-V2/V3 import/export against transformers, and the megads checkpoint format.

Randomly initialised tiny transformers models (norm weights and router biases randomised too, so a
swapped or missing tensor shows) are saved with save_pretrained and imported; logits must agree
within 1e-4 relative. Export -> import must be bit-exact, and transformers must load the export
and give megads's logits.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,  # noqa: E402
                          DeepseekV3ForCausalLM)

from megads import hf  # noqa: E402
from megads.config import ModelConfig  # noqa: E402
from megads.errors import CheckpointError  # noqa: E402
from megads.model import Transformer  # noqa: E402
from megads.model.io import load_model, save_model  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128,
            initializer_range=0.1)
YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
           "mscale": 0.707, "mscale_all_dim": 0.707}


def v3_config(**kw) -> DeepseekV3Config:
    base = dict(TINY, q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2, num_nextn_predict_layers=0)
    base.update(kw)
    return DeepseekV3Config(**base)


def v2_config(**kw) -> DeepseekV2Config:
    base = dict(TINY, q_lora_rank=None, n_shared_experts=2, topk_method="greedy", norm_topk_prob=False)
    base.update(kw)
    return DeepseekV2Config(**base)


def hf_model(config, seed=0):
    torch.manual_seed(seed)
    cls = DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # make every norm and router bias matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.2, 0.2)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tokens(B=2, S=24, V=256, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def check_import(model, tmp_path, S=24, **save_kw):
    path = tmp_path / "hf"
    model.save_pretrained(path, **save_kw)
    ours = hf.load(path)
    x = tokens(S=S)
    with torch.no_grad():
        ref = model(x).logits
        out = ours(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    return ours


# ----------------------------------------------------------------------------------- import

def test_v3_import_matches_transformers(tmp_path):
    """q_lora_rank > 0, group-limited routing (n_group 4, topk_group 2), random balancing bias,
    one dense layer first."""
    ours = check_import(hf_model(v3_config()), tmp_path)
    assert ours.cfg.score_func == "sigmoid" and ours.cfg.router_bias and ours.cfg.n_group == 4
    assert ours.cfg.first_k_dense == 1 and ours.cfg.q_lora_rank == 32 and ours.cfg.mtp_depth == 0
    assert ours.layers[1].ffn.gate.bias.abs().sum() > 0


def test_v3_yarn_import_matches_transformers(tmp_path):
    """YaRN with mscale != mscale_all_dim (cos/sin and softmax scales both differ from 1), at
    positions past original_max_position_embeddings; q_lora_rank = 0."""
    ours = check_import(hf_model(v3_config(rope_parameters=dict(YARN_V3), q_lora_rank=None)), tmp_path, S=48)
    assert ours.cfg.rope_scaling == "yarn" and ours.cfg.rope_factor == 4.0 and ours.cfg.mscale_all_dim == 0.8
    assert ours.rope.attention_factor != 1.0


def test_v3_non_interleaved_rope(tmp_path):
    check_import(hf_model(v3_config(rope_interleave=False)), tmp_path)


def test_v2_greedy_import_matches_transformers(tmp_path):
    ours = check_import(hf_model(v2_config()), tmp_path)
    assert ours.cfg.score_func == "softmax" and not ours.cfg.router_bias
    assert ours.cfg.n_group == 1 and ours.cfg.q_lora_rank == 0 and not ours.cfg.norm_topk_prob


def test_v2_group_limited_yarn_import_matches_transformers(tmp_path):
    cfg = v2_config(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=24,
                    routed_scaling_factor=1.5, rope_parameters=dict(YARN_V2))
    ours = check_import(hf_model(cfg), tmp_path, S=48)
    assert (ours.cfg.n_group, ours.cfg.topk_group, ours.cfg.rope_scaling) == (4, 2, "yarn")


def test_import_fused_experts_and_shards(tmp_path):
    """transformers' own fused expert tensors (save_original_format=False), sharded with an index."""
    model = hf_model(v3_config())
    path = tmp_path / "fused"
    model.save_pretrained(path, save_original_format=False, max_shard_size="40KB")
    names = json.loads((path / hf.INDEX_FILE).read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and len(set(names.values())) > 1
    ours = hf.load(path)
    x = tokens()
    with torch.no_grad():
        assert rel_err(ours(x), model(x).logits) < 1e-4


def test_import_legacy_rope_scaling_keys(tmp_path):
    """Published configs carry rope_theta + rope_scaling{type: yarn} instead of rope_parameters."""
    model = hf_model(v3_config(rope_parameters=dict(YARN_V3)))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    d = json.loads((path / "config.json").read_text())
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    rp.pop("rope_type")
    d["rope_scaling"] = {"type": "yarn", **rp}
    (path / "config.json").write_text(json.dumps(d))
    ours = hf.load(path)
    assert ours.cfg.rope_scaling == "yarn" and ours.cfg.mscale_all_dim == 0.8
    x = tokens(S=48)
    with torch.no_grad():
        assert rel_err(ours(x), model(x).logits) < 1e-4


# ----------------------------------------------------------------------------------- export

def megads_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_layers=3,
                first_k_dense=1, num_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=4, topk_group=2, score_func="sigmoid", route_scale=2.5, router_bias=True, mtp_depth=1,
                max_seq_len=128, init_std=0.1, rope_scaling="yarn", rope_factor=4.0, original_max_seq_len=32,
                mscale=1.0, mscale_all_dim=0.8)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def megads_model(cfg: ModelConfig, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for m in model.moe_layers():
            if m.gate.bias is not None:
                m.gate.bias.uniform_(-0.2, 0.2)
    return model


NO_YARN = dict(rope_scaling="none", rope_factor=1.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=0.0)
V2_LIKE = dict(score_func="softmax", router_bias=False, norm_topk_prob=False, q_lora_rank=0, route_scale=1.5,
               n_shared_experts=2, mscale=0.707, mscale_all_dim=0.707)


@pytest.mark.parametrize("kw", [{}, V2_LIKE, dict(tie_embeddings=True, n_group=1, topk_group=1, **NO_YARN)],
                         ids=["v3", "v2", "tied"])
def test_export_reimport_bit_exact(tmp_path, kw):
    model = megads_model(megads_cfg(**kw))
    out = hf.megads_to_hf(model, tmp_path / "hf", shard_size_bytes=60_000)
    assert (out / hf.INDEX_FILE).is_file()  # several shards
    back = hf.load(out)
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_export_names_and_config(tmp_path):
    cfg = megads_cfg()
    out = hf.megads_to_hf(megads_model(cfg), tmp_path / "hf")
    d = json.loads((out / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert d["num_nextn_predict_layers"] == 1 and d["rope_interleave"] is True
    with safe_open(str(out / hf.SINGLE_FILE), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    for n in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
              "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.2.self_attn.q_a_layernorm.weight",
              "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.norm.weight",
              "model.layers.3.shared_head.head.weight", "model.layers.3.mlp.experts.0.gate_proj.weight"]:
        assert n in names, n
    assert hf.config_from_hf(d) == cfg


@pytest.mark.parametrize("kw", [{}, V2_LIKE, dict(tie_embeddings=True, **NO_YARN)], ids=["v3", "v2", "tied"])
def test_transformers_loads_export(tmp_path, kw):
    model = megads_model(megads_cfg(**kw))
    out = hf.megads_to_hf(model, tmp_path / "hf", shard_size_bytes=200_000)
    cls = DeepseekV3ForCausalLM if model.cfg.score_func == "sigmoid" else DeepseekV2ForCausalLM
    theirs, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    x = tokens(S=48)
    with torch.no_grad():
        assert rel_err(model(x), theirs.eval()(x).logits) < 1e-4


def test_mtp_layout_matches_transformers_mtp_layer(tmp_path):
    """The exported MTP module, loaded into transformers' MtpLayer (DeepSeek's [emb; h] eh_proj
    order), computes what megads's MTP module computes."""
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3DecoderLayer, DeepseekV3RMSNorm,
                                                                      DeepseekV3RotaryEmbedding)

    model = megads_model(megads_cfg(rope_scaling="none"))
    out = hf.megads_to_hf(model, tmp_path / "hf")
    config = DeepseekV3Config.from_pretrained(out)
    config._attn_implementation = "eager"
    mcfg = config.get_mtp_config()
    layer = MtpLayer(mcfg, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, 0).eval()
    prefix = f"model.layers.{model.cfg.num_layers}."
    sd = {}
    with safe_open(str(out / hf.SINGLE_FILE), "pt") as f:
        for k in f.keys():
            if not k.startswith(prefix) or k.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                continue
            rest = k[len(prefix):]
            if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                sd[rest] = f.get_tensor(k)
            elif rest.startswith("shared_head.norm."):
                sd["post_norm." + rest[len("shared_head.norm."):]] = f.get_tensor(k)
            else:
                sd["mtp_block." + rest] = f.get_tensor(k)
    E = model.cfg.n_routed_experts  # the module holds its experts fused: [E, 2I, D] and [E, D, I]
    ex = "mtp_block.mlp.experts."
    sd[ex + "gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{ex}{e}.gate_proj.weight"),
                                                      sd.pop(f"{ex}{e}.up_proj.weight")]) for e in range(E)])
    sd[ex + "down_proj"] = torch.stack([sd.pop(f"{ex}{e}.down_proj.weight") for e in range(E)])
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "inv_freq" not in m]
    S = 10
    torch.manual_seed(3)
    h = torch.randn(2, S, 64)
    emb = torch.randn(2, S, 64)
    pos = torch.arange(S)
    with torch.no_grad():
        cos, sin = model.rope(pos, torch.float32)
        mod = model.mtp[0]
        ours = mod.norm(mod(h, emb, cos, sin)[0])
        rope = DeepseekV3RotaryEmbedding(mcfg)
        pe = rope(h, pos.unsqueeze(0))
        mask = torch.full((S, S), float("-inf")).triu(1).view(1, 1, S, S)
        theirs = layer(emb, h, pe, mask, pos.unsqueeze(0), None)
    assert rel_err(ours, theirs) < 1e-4


def test_import_skips_declared_but_absent_mtp(tmp_path):
    model = hf_model(v3_config(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path / "hf")
    assert hf.load(tmp_path / "hf").cfg.mtp_depth == 0


def test_config_round_trip():
    for cfg in [megads_cfg(), megads_cfg(**V2_LIKE), megads_cfg(**V2_LIKE, n_group=1, topk_group=1),
                megads_cfg(n_routed_experts=0, first_k_dense=3, mtp_depth=0, **NO_YARN)]:
        d = hf.config_to_hf(cfg)
        assert hf.config_from_hf(json.loads(json.dumps(d))) == cfg
    assert hf.config_to_hf(megads_cfg(**V2_LIKE, n_group=1, topk_group=1))["topk_method"] == "greedy"
    with pytest.raises(CheckpointError, match="router_bias"):
        hf.config_to_hf(megads_cfg(score_func="softmax"))


def test_fp8_block_dequant_on_import(tmp_path):
    """A published-style FP8 weight with its weight_scale_inv imports as w.float() * block scale."""
    model = megads_model(megads_cfg(mtp_depth=0, rope_scaling="none"))
    out = hf.megads_to_hf(model, tmp_path / "hf")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    with safe_open(str(out / hf.SINGLE_FILE), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    w = sd[name]  # [128, 16]
    scale = torch.tensor([[0.5], [2.0]])  # blocks of 64 x 16
    sd[name] = (w / scale.repeat_interleave(64, 0)).to(torch.float8_e4m3fn)
    sd[name + "_scale_inv"] = scale
    save_file(sd, str(out / hf.SINGLE_FILE))
    d = json.loads((out / "config.json").read_text())
    d["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [64, 16]}
    (out / "config.json").write_text(json.dumps(d))
    back = hf.load(out)
    expect = sd[name].float() * scale.repeat_interleave(64, 0)
    assert torch.equal(back.layers[1].attn.wkv_b.weight, expect)
    assert (back.layers[1].attn.wkv_b.weight - w).abs().max() < 0.1 * w.abs().max()


# ----------------------------------------------------------------------------------- errors

def test_errors_name_the_file_or_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        hf.load(tmp_path)
    out = hf.megads_to_hf(megads_model(megads_cfg(mtp_depth=0)), tmp_path / "hf")
    d = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(d, model_type="llama")))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        hf.load(out)
    (out / "config.json").write_text(json.dumps(d))
    with safe_open(str(out / hf.SINGLE_FILE), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(sd, str(out / hf.SINGLE_FILE))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        hf.load(out)
    with pytest.raises(CheckpointError, match="already holds"):
        hf.megads_to_hf(megads_model(megads_cfg(mtp_depth=0)), out)


def test_cli_convert_round_trip(tmp_path):
    from megads.cli import main

    model = megads_model(megads_cfg())
    save_model(model, tmp_path / "md")
    assert main(["convert", "megads-to-hf", str(tmp_path / "md"), str(tmp_path / "hf"),
                 "--shard-size", "100KB"]) == 0
    assert (tmp_path / "hf" / hf.INDEX_FILE).is_file()
    assert main(["convert", "hf-to-megads", str(tmp_path / "hf"), str(tmp_path / "md2")]) == 0
    back = load_model(tmp_path / "md2")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert main(["convert", "hf-to-megads", str(tmp_path / "nowhere"), str(tmp_path / "md3")]) == 2


# ----------------------------------------------------------------------------------- megads format

def test_megads_checkpoint_round_trip(tmp_path):
    model = megads_model(megads_cfg(tie_embeddings=True))
    save_model(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert "head.weight" not in f.keys()  # tied head stored once
    back = load_model(tmp_path / "ck")
    assert back.cfg == model.cfg and back.head.weight is back.embed.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    half = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16
    assert half.layers[1].ffn.gate.bias.dtype == torch.float32  # the balancing bias stays float32


def test_megads_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_model(tmp_path)
    model = megads_model(megads_cfg(mtp_depth=0))
    save_model(model, tmp_path / "ck")
    sd = {k: v for k, v in model.state_dict().items() if k != "layers.2.ffn.experts.w3"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.2.ffn.experts.w3"):
        load_model(tmp_path / "ck")
