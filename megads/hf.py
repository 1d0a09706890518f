"""HuggingFace DeepSeek-V2/V3 checkpoints: import into megads and export from it.

An HF directory holds `config.json` and safetensors weights (one `model.safetensors`, or shards
listed by `model.safetensors.index.json`) under transformers' names. The import streams: the
megads model is built on the meta device and filled tensor by tensor (each routed expert copied
into its slice of the stacked [E, out, in] tensors), so it never holds a second copy in memory.

Layout differences handled here (each exact, no arithmetic on the weights):

- RoPE: HF checkpoints store each head's rope dims (the last qk_rope_head_dim rows of every
  head's query slice, and the last qk_rope_head_dim rows of kv_a_proj_with_mqa) as interleaved
  pairs (x0,x1),(x2,x3)...; megads rotates first-half/second-half pairs. Import permutes those
  rows to [even..., odd...]; export inverts it. V2 always rotates interleaved pairs (complex
  multiply); V3 does when `rope_interleave` (the default; export always writes it true).
- Experts: the published per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight` (what
  `save_pretrained` writes) and transformers' fused `mlp.experts.gate_up_proj` [E, 2I, D] /
  `mlp.experts.down_proj` [E, D, I] (`save_pretrained(save_original_format=False)`) both import;
  export writes the per-expert names.
- MTP: module k lives at HF layer index num_hidden_layers + k (enorm, hnorm, eh_proj,
  shared_head.norm, and a full decoder layer); its eh_proj takes [enorm(emb); hnorm(h)], megads's
  takes [hnorm(h); enorm(emb)], so the two column halves are swapped. Imported when the weights
  are there (else mtp_depth becomes 0); exported with the copies of the embedding and head that
  the published V3 checkpoint carries (shared_head.head, embed_tokens).
- FP8 checkpoints (the published V3 weights): `X.weight` in float8_e4m3fn with its block scales
  `X.weight_scale_inv` are dequantized on the fly.

Both conversions check every tensor they write is finite (a CheckpointError names the first one
that is not), copy the tokenizer files of the source directory along (the export adds what
`AutoTokenizer.from_pretrained` needs), write files with the default mode (0644 under umask 022),
and remove what they wrote when they fail (the whole destination when they created it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from megads.config import ModelConfig, model_config_from_dict
from megads.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

V2, V3 = "deepseek_v2", "deepseek_v3"
ARCHITECTURES = {V2: "DeepseekV2ForCausalLM", V3: "DeepseekV3ForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9
# tokenizer files (HF names) that travel with a checkpoint; megads's own tokenizer is the first two
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")

# Values the transformers config classes use for keys a config.json leaves out.
_DEFAULTS = {
    V3: dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
             num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
             routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
             qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
             norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
             initializer_range=0.02, scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0),
    V2: dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
             num_hidden_layers=32, num_attention_heads=32, n_shared_experts=2, n_routed_experts=64,
             routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
             qk_nope_head_dim=128, n_group=None, topk_group=None, num_experts_per_tok=None,
             first_k_dense_replace=0, norm_topk_prob=False, max_position_embeddings=2048, rms_norm_eps=1e-6,
             tie_word_embeddings=False, initializer_range=0.02, scoring_func="softmax", topk_method="greedy",
             num_nextn_predict_layers=0),
}
# megads training fields with no HF key: kept under "megads" in config.json for a lossless round trip
_MEGADS_EXTRAS = ("bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "mtp_lambda", "cache_dtype")


# =============================================================================== config

def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig of an HF DeepSeek-V2/V3 config dict (the contents of config.json)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    mt = d.get("model_type")
    if mt not in _DEFAULTS:
        raise CheckpointError(f"{where}: model_type {mt!r} is not supported (expected {V2!r} or {V3!r})")
    dflt = _DEFAULTS[mt]

    def get(key, default=None):
        if key in d:
            return d[key]
        return dflt.get(key, default)

    def bad(key, rule):
        raise CheckpointError(f"{where}: {key}: {rule}")

    if get("hidden_act", "silu") != "silu":
        bad("hidden_act", f"megads implements SwiGLU (silu) only, got {get('hidden_act')!r}")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            bad(key, "projection biases are not supported by megads")
    n_routed = get("n_routed_experts") or 0
    L = get("num_hidden_layers")
    out = dict(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        moe_intermediate_size=get("moe_intermediate_size") or 0, num_layers=L,
        first_k_dense=min(get("first_k_dense_replace") or 0, L) if n_routed else L,
        num_heads=get("num_attention_heads"), q_lora_rank=get("q_lora_rank") or 0,
        kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"),
        n_routed_experts=n_routed, n_shared_experts=get("n_shared_experts") or 0,
        num_experts_per_tok=get("num_experts_per_tok") or (1 if not n_routed else None),
        route_scale=float(get("routed_scaling_factor", 1.0)), norm_topk_prob=bool(get("norm_topk_prob")),
        mtp_depth=int(get("num_nextn_predict_layers", get("num_mtp_layers", 0)) or 0),
        max_seq_len=get("max_position_embeddings"), rms_norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")), init_std=float(get("initializer_range", 0.02)),
    )
    if n_routed and out["num_experts_per_tok"] is None:
        bad("num_experts_per_tok", "must be set for a model with routed experts")
    topk_method = get("topk_method")
    if mt == V3:
        if get("scoring_func") != "sigmoid":
            bad("scoring_func", f"DeepSeek-V3 routing is 'sigmoid', got {get('scoring_func')!r}")
        out.update(score_func="sigmoid", router_bias=True, n_group=get("n_group") or 1,
                   topk_group=get("topk_group") or 1)
    else:
        if get("scoring_func") != "softmax":
            bad("scoring_func", f"DeepSeek-V2 routing is 'softmax', got {get('scoring_func')!r}")
        if topk_method == "greedy":
            n_group, topk_group = 1, 1
        elif topk_method == "group_limited_greedy":
            n_group, topk_group = get("n_group") or 1, get("topk_group") or 1
        else:
            bad("topk_method", f"must be 'greedy' or 'group_limited_greedy', got {topk_method!r}")
        out.update(score_func="softmax", router_bias=False, n_group=n_group, topk_group=topk_group)
        if out["num_experts_per_tok"] == 1:
            out["norm_topk_prob"] = False  # DeepSeek-V2 normalises only when top_k > 1
    out.update(_rope_from_hf(d, get, bad))
    extras = d.get("megads") or {}
    if isinstance(extras, dict):
        out.update({k: v for k, v in extras.items() if k in _MEGADS_EXTRAS})
    for key, value in out.items():
        if value is None:
            raise CheckpointError(f"{where}: missing key for megads field {key!r}")
    try:
        return model_config_from_dict(out)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _rope_from_hf(d: dict, get, bad) -> dict:
    """rope_theta and YaRN fields from transformers 5's `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling` (the published configs)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        bad("rope_parameters", f"expected an object, got {rp!r}")
    rtype = rp.get("rope_type") or rp.get("type") or "default"
    theta = float(rp.get("rope_theta") or d.get("rope_theta") or 10000.0)
    out = dict(rope_theta=theta)
    if rtype == "default":
        return dict(out, rope_scaling="none")
    if rtype != "yarn":
        bad("rope_parameters.rope_type", f"megads supports 'default' and 'yarn' RoPE, got {rtype!r}")
    max_pos = get("max_position_embeddings")
    orig = d.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos
    factor = rp.get("factor") or (max_pos / orig)
    if rp.get("truncate", True) is False:
        bad("rope_parameters.truncate", "megads implements the truncated YaRN correction range only")
    mscale, mscale_all_dim = float(rp.get("mscale") or 0.0), float(rp.get("mscale_all_dim") or 0.0)
    out.update(rope_scaling="yarn", rope_factor=float(factor), original_max_seq_len=int(orig),
               beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
               mscale=mscale, mscale_all_dim=mscale_all_dim)
    if rp.get("attention_factor") is not None:  # an explicit cos/sin scale must be the one megads derives
        from megads.model.rope import yarn_get_mscale

        derived = (yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
                   if mscale and mscale_all_dim else yarn_get_mscale(factor))
        if not math.isclose(float(rp["attention_factor"]), derived, rel_tol=1e-6):
            bad("rope_parameters.attention_factor", f"{rp['attention_factor']} differs from the YaRN value "
                f"{derived} megads derives from factor/mscale/mscale_all_dim")
    return out


def hf_model_type(cfg: ModelConfig) -> str:
    """deepseek_v3 (sigmoid + balancing bias) or deepseek_v2 (softmax, no bias)."""
    if cfg.attention != "mla":
        raise CheckpointError(f"model.attention: {cfg.attention} (megads's comparison baseline) has no DeepSeek HF "
                              f"equivalent; only MLA models convert")
    moe = cfg.n_routed_experts > 0 and cfg.first_k_dense < cfg.num_layers
    if cfg.score_func == "sigmoid":
        if moe and not cfg.router_bias and cfg.n_group > 1:
            raise CheckpointError("model: score_func=sigmoid without router_bias and n_group > 1 has no HF "
                                  "equivalent (DeepSeek-V3 ranks groups by their top-2 biased scores)")
        return V3
    if moe and cfg.router_bias:
        raise CheckpointError("model: score_func=softmax with router_bias has no HF equivalent "
                              "(DeepSeek-V2 routes without a balancing bias)")
    return V2


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json contents for `cfg` (model_type and architectures from score_func/router_bias)."""
    mt = hf_model_type(cfg)
    moe = cfg.n_routed_experts > 0 and cfg.first_k_dense < cfg.num_layers
    d = {
        "architectures": [ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.first_k_dense if moe else cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc" if mt == V3 else ("greedy" if cfg.n_group == 1 else "group_limited_greedy"),
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }
    if mt == V3:
        d["rope_interleave"] = True
    if mt == V3 or cfg.mtp_depth:
        d["num_nextn_predict_layers"] = cfg.mtp_depth
    if mt == V2 and cfg.norm_topk_prob:
        log.warning("DeepSeek-V2 with norm_topk_prob=true: transformers' DeepseekV2 ignores it (DeepSeek's "
                    "own code honours it); logits of the two will differ")
    # transformers 5 reads rope_parameters; vLLM, SGLang and older transformers read the top-level pair
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    d["rope_theta"] = cfg.rope_theta
    d["rope_scaling"] = None
    if cfg.rope_scaling == "yarn":
        yarn = {"factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_max_seq_len,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale_all_dim}
        params = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **yarn}
        d["rope_scaling"] = {"type": "yarn", **yarn}
    d["rope_parameters"] = params
    d["megads"] = {k: getattr(cfg, k) for k in _MEGADS_EXTRAS}
    return d


# =============================================================================== name map

PLAIN, Q_ROPE, KV_ROPE, EH_SWAP = "plain", "q_rope", "kv_rope", "eh_swap"


@dataclass(frozen=True)
class Entry:
    """One HF tensor <-> (a slice of) one megads tensor."""

    hf: str
    md: str
    kind: str = PLAIN
    expert: int | None = None  # index into a stacked expert tensor
    export_only: bool = False  # a copy the published layout carries (MTP's embedding and head)


def _block_entries(cfg: ModelConfig, hf: str, md: str, moe: bool) -> list[Entry]:
    a, m = hf + "self_attn.", md + "attn."
    out = [Entry(hf + "input_layernorm.weight", md + "attn_norm.weight")]
    if cfg.q_lora_rank:
        out += [Entry(a + "q_a_proj.weight", m + "wq_a.weight"),
                Entry(a + "q_a_layernorm.weight", m + "q_norm.weight"),
                Entry(a + "q_b_proj.weight", m + "wq_b.weight", Q_ROPE)]
    else:
        out.append(Entry(a + "q_proj.weight", m + "wq.weight", Q_ROPE))
    out += [Entry(a + "kv_a_proj_with_mqa.weight", m + "wkv_a.weight", KV_ROPE),
            Entry(a + "kv_a_layernorm.weight", m + "kv_norm.weight"),
            Entry(a + "kv_b_proj.weight", m + "wkv_b.weight"),
            Entry(a + "o_proj.weight", m + "wo.weight"),
            Entry(hf + "post_attention_layernorm.weight", md + "ffn_norm.weight")]
    f, g = hf + "mlp.", md + "ffn."
    if not moe:
        return out + [Entry(f + "gate_proj.weight", g + "w1.weight"), Entry(f + "up_proj.weight", g + "w3.weight"),
                      Entry(f + "down_proj.weight", g + "w2.weight")]
    out.append(Entry(f + "gate.weight", g + "gate.weight"))
    if cfg.router_bias:
        out.append(Entry(f + "gate.e_score_correction_bias", g + "gate.bias"))
    for e in range(cfg.n_routed_experts):
        x = f"{f}experts.{e}."
        out += [Entry(x + "gate_proj.weight", g + "experts.w1", expert=e),
                Entry(x + "up_proj.weight", g + "experts.w3", expert=e),
                Entry(x + "down_proj.weight", g + "experts.w2", expert=e)]
    if cfg.n_shared_experts:
        out += [Entry(f + "shared_experts.gate_proj.weight", g + "shared.w1.weight"),
                Entry(f + "shared_experts.up_proj.weight", g + "shared.w3.weight"),
                Entry(f + "shared_experts.down_proj.weight", g + "shared.w2.weight")]
    return out


def weight_map(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of `cfg` with its megads source/target, in the order HF writes them."""
    out = [Entry("model.embed_tokens.weight", "embed.weight")]
    for i in range(cfg.num_layers):
        out += _block_entries(cfg, f"model.layers.{i}.", f"layers.{i}.", cfg.is_moe_layer(i))
    out.append(Entry("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", "head.weight"))
    for k in range(cfg.mtp_depth):
        hf, md = f"model.layers.{cfg.num_layers + k}.", f"mtp.{k}."
        out += [Entry(hf + "embed_tokens.weight", "embed.weight", export_only=True),
                Entry(hf + "enorm.weight", md + "enorm.weight"),
                Entry(hf + "hnorm.weight", md + "hnorm.weight"),
                Entry(hf + "eh_proj.weight", md + "eh_proj.weight", EH_SWAP)]
        out += _block_entries(cfg, hf, md + "block.", cfg.n_routed_experts > 0)
        out += [Entry(hf + "shared_head.norm.weight", md + "norm.weight"),
                Entry(hf + "shared_head.head.weight", "head.weight", export_only=True)]
    return out


def _rope_perm(rope: int) -> torch.Tensor:
    """megads rope dim j <- HF dim perm[j]: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


def _row_index(cfg: ModelConfig, kind: str, to_megads: bool) -> torch.Tensor:
    perm = _rope_perm(cfg.qk_rope_head_dim)
    if not to_megads:
        perm = torch.argsort(perm)
    if kind == Q_ROPE:
        qk = cfg.head_dim_qk
        per_head = torch.cat([torch.arange(cfg.qk_nope_head_dim), cfg.qk_nope_head_dim + perm])
        return (torch.arange(cfg.num_heads).unsqueeze(1) * qk + per_head).reshape(-1)
    return torch.cat([torch.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + perm])  # KV_ROPE


def _convert(t: torch.Tensor, kind: str, cfg: ModelConfig, interleaved: bool, to_megads: bool) -> torch.Tensor:
    if kind in (Q_ROPE, KV_ROPE):
        return t.index_select(0, _row_index(cfg, kind, to_megads)) if interleaved else t
    if kind == EH_SWAP:  # [emb | h] <-> [h | emb]: swapping the halves is its own inverse
        D = cfg.hidden_size
        return torch.cat([t[:, D:], t[:, :D]], dim=1)
    return t


# =============================================================================== finite check

_FINITE_CHUNK = 1 << 24  # elements per isfinite mask: bounded extra memory whatever the tensor's size


def _nonfinite(t: torch.Tensor) -> int:
    """How many values of `t` are inf or NaN (0 for integer tensors), counted chunk by chunk."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        c = flat[i:i + _FINITE_CHUNK]
        if c.element_size() == 1:
            c = c.float()  # float8: isfinite has no kernel for it
        bad += c.numel() - int(torch.isfinite(c).sum())
    return bad


def _check_finite(t: torch.Tensor, where, name: str, source: torch.Tensor | None = None) -> None:
    """CheckpointError naming `name` (already quoted) when `t` holds inf/NaN. `source` is the tensor
    `t` was cast from, to tell an overflow of the cast from values broken at the source."""
    n = _nonfinite(t)
    if not n:
        return
    cast = ""
    if source is not None and source.dtype != t.dtype and not _nonfinite(source):
        cast = f" after the cast to {str(t.dtype).replace('torch.', '')}"
    raise CheckpointError(f"{where}: tensor {name} has {n} non-finite value{'s' if n > 1 else ''} "
                          f"(inf/NaN){cast}; refusing to convert")


# =============================================================================== reading HF

class _HFReader:
    """Tensors of an HF directory by name, opening each safetensors file once (memory-mapped)."""

    def __init__(self, path: Path, quant_cfg: dict | None = None):
        from safetensors import safe_open

        self.path = path
        self._open = safe_open
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        index = path / INDEX_FILE
        self.where: dict[str, str] = {}
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            for name, fname in wm.items():
                if not (path / fname).is_file():
                    raise CheckpointError(f"{path / fname}: listed in {INDEX_FILE} (for {name!r}) but missing")
            self.where = dict(wm)
        else:
            files = [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
            for file in files:
                for name in self._handle(file.name).keys():
                    self.where[name] = file.name
        qc = quant_cfg or {}
        self.block = tuple(qc.get("weight_block_size") or (128, 128))

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = self._stack.enter_context(self._open(str(self.path / fname), framework="pt", device="cpu"))
            except Exception as e:
                raise CheckpointError(f"{self.path / fname}: cannot read safetensors ({e})") from None
            self._handles[fname] = h
        return h

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        """All tensor names, grouped by file (sequential reads)."""
        return sorted(self.where, key=lambda n: (self.where[n], n))

    def raw(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.where[name]).get_tensor(name)
        except KeyError:
            raise CheckpointError(f"{self.path / self.where[name]}: tensor {name!r} listed but absent") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor, dequantized when it is an FP8 weight with block scales."""
        t = self.raw(name)
        scale_name = name + "_scale_inv"
        if t.element_size() == 1 and t.is_floating_point() and scale_name in self:
            t = _dequant_blocks(t, self.raw(scale_name), self.block)
        return t

    def close(self):
        self._stack.close()


def _dequant_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weight [out, in] with per-(bo x bi)-block scales [ceil(out/bo), ceil(in/bi)] -> float32."""
    bo, bi = block
    out, inn = w.shape
    s = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inn]
    return w.float() * s


def read_hf_config(path: str | os.PathLike) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not found (an HF checkpoint directory has config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", check_finite: bool = False):
    """A megads Transformer with the weights of an HF DeepSeek-V2/V3 directory (streamed).

    check_finite: raise CheckpointError on the first tensor holding inf/NaN once cast to `dtype`.
    """
    from megads.model.io import empty_model

    path = Path(path)
    d = read_hf_config(path)
    cfg = config_from_hf(d, str(path / "config.json"))
    reader = _HFReader(path, d.get("quantization_config"))
    try:
        present = 0
        while present < cfg.mtp_depth and f"model.layers.{cfg.num_layers + present}.eh_proj.weight" in reader:
            present += 1
        if present < cfg.mtp_depth:
            log.info("%s: config declares %d MTP module(s), the weights hold %d; importing %d",
                     path, cfg.mtp_depth, present, present)
            cfg.mtp_depth = present
        model = empty_model(cfg, dtype, device)
        interleaved = d.get("model_type") == V2 or bool(d.get("rope_interleave", True))
        _fill(model, cfg, reader, interleaved, check_finite)
    finally:
        reader.close()
    return model


_FUSED = re.compile(r"^(?P<p>.*\.)mlp\.experts\.(?P<w>gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|_scale_inv)$")


def fill_sharded(model, path: str | os.PathLike, slicer) -> None:
    """Fill a model built in a parallel layout straight from an HF directory, tensor by tensor:
    `slicer(md_name, full_tensor, expert)` -> (this rank's slice, local expert index), or
    (None, None) for an expert another rank holds. No rank materialises the full model."""
    path = Path(path)
    d = read_hf_config(path)
    cfg = model.cfg
    reader = _HFReader(path, d.get("quantization_config"))
    try:
        interleaved = d.get("model_type") == V2 or bool(d.get("rope_interleave", True))
        _fill(model, cfg, reader, interleaved, slicer=slicer)
    finally:
        reader.close()


def _fill(model, cfg: ModelConfig, reader: _HFReader, interleaved: bool, check_finite: bool = False,
          slicer=None) -> None:
    targets = model.state_dict(keep_vars=True)
    every = weight_map(cfg)
    entries = [e for e in every if not e.export_only]
    copies = {e.hf for e in every if e.export_only}  # MTP's copies of the embedding and head
    by_hf = {e.hf: e for e in entries}
    md_prefix = {}  # HF block prefix -> megads block prefix (for fused experts)
    for e in entries:
        if e.expert == 0 and e.md.endswith("experts.w1"):
            md_prefix[e.hf[: -len("experts.0.gate_proj.weight")]] = e.md[: -len("experts.w1")]
    filled: set[tuple[str, int | None]] = set()
    n_layers = cfg.num_layers + cfg.mtp_depth

    def put(md: str, t: torch.Tensor, expert: int | None, src: str, fused: bool = False) -> None:
        full_expert = expert
        if slicer is not None:  # a sharded model: keep this rank's part only
            t, expert = slicer(md, t, expert)
            if t is None:
                filled.add((md, full_expert))
                return
        dst = targets[md] if expert is None else targets[md][expert]
        if tuple(t.shape) != tuple(dst.shape):
            raise CheckpointError(f"{reader.path}: tensor {src!r} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(dst.shape)} from config.json")
        with torch.no_grad():
            dst.copy_(t)
        if check_finite:  # the value as written (after the cast to the model's dtype)
            label = f"{src!r}" + (f" (expert {expert})" if fused else "")
            _check_finite(dst, reader.path / reader.where[src], label, source=t)
        filled.add((md, full_expert))

    for name in reader.names():
        e = by_hf.get(name)
        if e is not None:
            if e.md not in targets:  # another pipeline stage's tensor: not read
                continue
            put(e.md, _convert(reader.get(name), e.kind, cfg, interleaved, True), e.expert, name)
            continue
        fused = _FUSED.match(name)
        if fused and fused.group("p") + "mlp." in md_prefix:
            g = md_prefix[fused.group("p") + "mlp."]
            if g + "experts.w1" not in targets:
                continue
            t = reader.get(name)
            if fused.group("w") == "gate_up_proj":
                I = cfg.moe_intermediate_size
                if t.dim() != 3 or t.shape[1] != 2 * I:
                    raise CheckpointError(f"{reader.path}: tensor {name!r} has shape {tuple(t.shape)}, "
                                          f"expected [E, {2 * I}, D]")
                w1, w3 = t[:, :I], t[:, I:]
                for e_ in range(cfg.n_routed_experts):
                    put(g + "experts.w1", w1[e_], e_, name, fused=True)
                    put(g + "experts.w3", w3[e_], e_, name, fused=True)
            else:
                for e_ in range(cfg.n_routed_experts):
                    put(g + "experts.w2", t[e_], e_, name, fused=True)
            continue
        layer = _LAYER.match(name)
        if name in copies or _IGNORED.search(name) or (layer and int(layer.group(1)) >= n_layers):
            continue  # rope tables, FP8 scales (used with their weight), MTP modules not imported
        raise CheckpointError(f"{reader.path}: unexpected tensor {name!r} (not part of the model that "
                              f"config.json describes)")
    for e in entries:
        if (e.md, e.expert) not in filled and e.md in targets:
            raise CheckpointError(f"{reader.path}: missing tensor {e.hf!r}")
    if cfg.tie_embeddings and getattr(model, "head", None) is not None and getattr(model, "embed", None) is not None:
        model.head.weight = model.embed.weight


# =============================================================================== writing HF

class _MegadsSource:
    """megads tensors by name, from a live model or a megads checkpoint directory (memory-mapped)."""

    def __init__(self, src):
        from megads.model.io import WEIGHTS_FILE, read_config, state_for_save

        self._stack = ExitStack()
        if isinstance(src, (str, os.PathLike)):
            from safetensors import safe_open

            self.cfg = read_config(src)
            file = Path(src) / WEIGHTS_FILE
            if not file.is_file():
                raise CheckpointError(f"{file}: not found")
            try:
                self._f = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
            self._state = None
            self._names = set(self._f.keys())
            self.where = str(file)
        else:
            from megads.model.io import unwrap

            model = unwrap(src)
            self.cfg = model.cfg
            self._state = state_for_save(model)
            self._names = set(self._state)
            self.where = "model"
        if self.cfg.tie_embeddings and "head.weight" not in self._names:
            self._alias = {"head.weight": "embed.weight"}
        else:
            self._alias = {}

    def _check(self, name: str) -> str:
        name = self._alias.get(name, name)
        if name not in self._names:
            raise CheckpointError(f"{self.where}: missing tensor {name!r}")
        return name

    def shape_dtype(self, name: str, expert: int | None) -> tuple[tuple[int, ...], torch.dtype]:
        name = self._check(name)
        if self._state is not None:
            t = self._state[name]
            shape, dtype = tuple(t.shape), t.dtype
        else:
            sl = self._f.get_slice(name)
            shape = tuple(sl.get_shape())
            dtype = _ST_DTYPES[sl.get_dtype()]
        return (shape[1:] if expert is not None else shape), dtype

    def get(self, name: str, expert: int | None) -> torch.Tensor:
        name = self._check(name)
        if self._state is not None:
            t = self._state[name]
            return t if expert is None else t[expert]
        if expert is None:
            return self._f.get_tensor(name)
        return self._f.get_slice(name)[expert]

    def close(self):
        self._stack.close()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _out_dtype(md_name: str, src_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if md_name.endswith("gate.bias"):
        return torch.float32  # e_score_correction_bias stays float32 (as transformers keeps it)
    return dtype or src_dtype


def megads_to_hf(src, dst: str | os.PathLike, shard_size_bytes: int = DEFAULT_SHARD_BYTES,
                 dtype: torch.dtype | None = None, overwrite: bool = False,
                 extra_config: dict | None = None, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a megads model (a Transformer, or a megads checkpoint directory, read memory-mapped)
    as an HF DeepSeek-V2/V3 directory: config.json and safetensors shards of at most
    `shard_size_bytes` (one `model.safetensors` when everything fits), with an index otherwise.

    Tensors are materialised one shard at a time, and each must be finite once cast (else a
    CheckpointError names it). `dtype` casts the weights (default: as stored); `extra_config` adds
    keys to config.json (e.g. bos_token_id / eos_token_id). The tokenizer files (TOKENIZER_FILES)
    of `tokenizer` (default: `src` when it is a directory) are copied along; with a tokenizer.json,
    `dst` also gets a tokenizer_config.json that `transformers.AutoTokenizer` loads as a fast
    tokenizer, and config.json the bos/eos token ids. On any failure the files this call wrote are
    removed again (`dst` itself when the call created it).
    """
    dst = Path(dst)
    _not_in_place(src, dst)
    if tokenizer is None and isinstance(src, (str, os.PathLike)):
        tokenizer = src
    tok_files = _tokenizer_files(tokenizer)
    tok_names = [f.name for f in tok_files]
    if "tokenizer.json" in tok_names and "tokenizer_config.json" not in tok_names:
        tok_names.append("tokenizer_config.json")  # written by _hf_tokenizer_config
    with _Output(dst, overwrite, ("config.json", "*.safetensors", INDEX_FILE, *tok_names)) as out:
        source = _MegadsSource(src)
        try:
            cfg = source.cfg
            d = config_to_hf(cfg)
            plan = []  # (entry, nbytes, out dtype)
            for e in weight_map(cfg):
                shape, sdt = source.shape_dtype(e.md, e.expert)
                odt = _out_dtype(e.md, sdt, dtype)
                plan.append((e, math.prod(shape) * torch.empty((), dtype=odt).element_size(), odt))
            shards: list[list] = [[]]
            size = 0
            for item in plan:
                if shards[-1] and size + item[1] > shard_size_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append(item)
                size += item[1]
            n = len(shards)
            names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            wmap = {}
            for fname, shard in zip(names, shards):
                tensors = {}
                for e, _, odt in shard:
                    t = _convert(source.get(e.md, e.expert), e.kind, cfg, True, False)
                    o = t.to(odt).contiguous().clone()  # own storage: no sharing inside a file
                    md = e.md if e.expert is None else f"{e.md}[{e.expert}]"
                    _check_finite(o, source.where, f"{md!r} (HF {e.hf!r})", source=t)
                    tensors[e.hf] = o
                    wmap[e.hf] = fname
                out.write_safetensors(fname, tensors)
                del tensors
            if n > 1:
                out.write_json(INDEX_FILE, {"metadata": {"total_size": sum(b for _, b, _ in plan)},
                                            "weight_map": wmap})
            main_dtype = next(odt for e, _, odt in plan if e.md == "embed.weight")
            d["dtype"] = str(main_dtype).replace("torch.", "")
            for f in tok_files:
                out.copy(f)
            if "tokenizer.json" in tok_names:
                _hf_tokenizer_config(out, d, cfg)
            d.update(extra_config or {})
            out.write_json("config.json", d)
        finally:
            source.close()
    return dst


def hf_to_megads(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Convert an HF DeepSeek-V2/V3 directory into a megads checkpoint directory.

    dtype: of the written weights; default the checkpoint's own (bfloat16 for FP8 checkpoints).
    Every tensor must be finite once cast (else a CheckpointError names it). The tokenizer files
    of `src` are copied along, so `megads generate --checkpoint DST` finds its tokenizer.json. On
    any failure the files this call wrote are removed again (`dst` itself when the call created it).
    """
    from megads.model.io import CONFIG_FILE, WEIGHTS_FILE, save_model

    src, dst = Path(src), Path(dst)
    _not_in_place(src, dst)
    tok_files = _tokenizer_files(src)
    with _Output(dst, overwrite, (CONFIG_FILE, WEIGHTS_FILE, *[f.name for f in tok_files])) as out:
        if dtype is None:
            dtype = _checkpoint_dtype(src)
        model = load(src, dtype=dtype, check_finite=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # what save_model writes (each via NAME.tmp)
            out.path(name + ".tmp")
            out.path(name)
        save_model(model, dst)
        for f in tok_files:
            out.copy(f)
    return dst


def _checkpoint_dtype(path: Path) -> torch.dtype:
    reader = _HFReader(path)
    try:
        name = next((n for n in reader.names() if n.endswith("embed_tokens.weight")), None)
        if name is None:
            return torch.float32
        dt = reader.raw(name).dtype
        return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
    finally:
        reader.close()


def _not_in_place(src, dst: Path) -> None:
    """A conversion never writes into its own source (--force would delete the weights it reads)."""
    if isinstance(src, (str, os.PathLike)) and dst.exists() and Path(src).resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the destination is the source directory; choose another destination")


def _tokenizer_files(directory) -> list[Path]:
    """The TOKENIZER_FILES present in `directory` (none when it is None or not a directory)."""
    if directory is None or not Path(directory).is_dir():
        return []
    return [Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()]


def _hf_tokenizer_config(out: "_Output", d: dict, cfg: ModelConfig) -> None:
    """Make the tokenizer.json copied into `out.dst` loadable by `AutoTokenizer.from_pretrained`.

    tokenizer_config.json (a copied one keeps every key it sets) gets tokenizer_class
    PreTrainedTokenizerFast (transformers' class for a bare tokenizer.json), the bos/eos/pad tokens
    (megads's <|bos|>/<|eos|>/<|pad|> where the config names none), the other megads special tokens
    and model_max_length; the HF config dict `d` gets bos_token_id / eos_token_id where unset.
    """
    from megads.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, load_tokenizer

    vocab = load_tokenizer(out.dst).hf
    file = out.dst / "tokenizer_config.json"
    old = None
    if file.is_file():
        try:
            old = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(old, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
    tc = dict(old or {})
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for role, default in (("bos", BOS), ("eos", EOS), ("pad", PAD)):
        token = tc.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token  # older AddedToken form
        if token is None and vocab.token_to_id(default) is not None:
            token = tc[f"{role}_token"] = default
        tid = vocab.token_to_id(token) if isinstance(token, str) else None
        if role != "pad" and tid is not None:
            d.setdefault(f"{role}_token_id", tid)
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD) and vocab.token_to_id(t) is not None]
    if extra:
        tc.setdefault("additional_special_tokens", extra)
    tc.setdefault("model_max_length", cfg.max_seq_len)
    if tc != old:
        out.write_json("tokenizer_config.json", tc)


def _prepare_dst(dst: Path, overwrite: bool, patterns: tuple[str, ...]) -> None:
    existing = [p for pat in patterns for p in dst.glob(pat)] if dst.is_dir() else []
    if existing and not overwrite:
        raise CheckpointError(f"{dst}: already holds {existing[0].name}; choose an empty directory "
                              f"(or overwrite=True / --force)")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory")
    for p in existing:
        if p.name.endswith(".safetensors") or p.name == INDEX_FILE:
            p.unlink()  # stale shards of an earlier export must not mix with the new ones
    dst.mkdir(parents=True, exist_ok=True)


def _stat_sig(p: Path) -> tuple[int, int, int]:
    """(inode, mtime, size) of `p` itself: changes when a file is rewritten or replaced."""
    st = os.lstat(p)
    return st.st_ino, st.st_mtime_ns, st.st_size


class _Output:
    """The destination directory of one conversion, used as `with _Output(...) as out:`.

    Creating it refuses to clobber an existing checkpoint (see _prepare_dst) and creates `dst`.
    Every file the conversion writes goes through `path` (or the write helpers, which write under
    NAME.tmp and rename, with the default file mode). If the `with` body raises, `discard` removes
    the outermost directory this conversion created when `dst` did not exist before; otherwise only
    the registered files that are new or were rewritten since the start, never the user's others.
    """

    def __init__(self, dst: Path, overwrite: bool, patterns: tuple[str, ...]):
        created, p = None, dst.absolute()
        while not p.exists() and not p.is_symlink():
            created, p = p, p.parent
        _prepare_dst(dst, overwrite, patterns)  # a refusal happens before anything is registered
        self.dst = dst
        self.created = created
        self.before = {} if created else {q.name: _stat_sig(q) for q in dst.iterdir()}
        self.paths: list[Path] = []

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.discard()
        return False

    def path(self, name: str) -> Path:
        """dst/name, registered as written by this conversion."""
        p = self.dst / name
        self.paths.append(p)
        return p

    def _replace(self, name: str, write) -> None:
        from megads.model.io import set_default_mode

        tmp, final = self.path(name + ".tmp"), self.path(name)
        write(tmp)
        set_default_mode(tmp)
        os.replace(tmp, final)

    def write_safetensors(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        self._replace(name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))

    def write_json(self, name: str, obj) -> None:
        self._replace(name, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))

    def copy(self, file: Path) -> None:
        """Copy `file` (contents only: the copy gets the default mode) to dst under its own name."""
        self._replace(file.name, lambda tmp: shutil.copyfile(file, tmp))

    def discard(self) -> None:
        """Remove what this conversion wrote (see the class docstring); errors are logged only."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for p in dict.fromkeys(self.paths):
            try:
                if _stat_sig(p) != self.before.get(p.name):  # new, or rewritten by this conversion
                    p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: cannot remove after the failed conversion (%s)", p, e)


# =============================================================================== CLI

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '123' bytes -> int."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"--shard-size {text!r}: expected e.g. 5GB, 500MiB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def _dtype_arg(name: str | None):
    return None if name in (None, "auto") else _DTYPES[name]


def _cmd_hf_to_megads(args) -> int:
    out = hf_to_megads(args.src, args.dst, dtype=_dtype_arg(args.dtype), overwrite=args.force)
    print(f"wrote megads checkpoint {out}")
    return 0


def _cmd_megads_to_hf(args) -> int:
    out = megads_to_hf(args.src, args.dst, shard_size_bytes=parse_size(args.shard_size),
                       dtype=_dtype_arg(args.dtype), overwrite=args.force)
    print(f"wrote HF checkpoint {out}")
    return 0


def add_subcommands(subparsers) -> None:
    """`megads convert hf-to-megads SRC DST` and `megads convert megads-to-hf SRC DST`."""
    p = subparsers.add_parser("convert", help="convert checkpoints between HF DeepSeek-V2/V3 and megads")
    sub = p.add_subparsers(dest="convert_command", required=True)
    a = sub.add_parser("hf-to-megads", help="HF directory (config.json + safetensors) -> megads checkpoint")
    a.add_argument("src", help="HF DeepSeek-V2/V3 directory (config.json + *.safetensors)")
    a.add_argument("dst", help="megads model directory to write (config.yaml + model.safetensors)")
    a.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="weights dtype (auto: as stored)")
    a.add_argument("--force", action="store_true", help="replace an existing checkpoint in DST")
    a.set_defaults(func=_cmd_hf_to_megads)
    b = sub.add_parser("megads-to-hf", help="megads checkpoint -> HF directory transformers can load")
    b.add_argument("src", help="megads model directory (a run's final/)")
    b.add_argument("dst", help="HF directory to write (config.json, safetensors shards, tokenizer files)")
    b.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="weights dtype (auto: as stored)")
    b.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    b.add_argument("--force", action="store_true", help="replace an existing checkpoint in DST")
    b.set_defaults(func=_cmd_megads_to_hf)
