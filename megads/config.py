"""Typed configuration: one dataclass per section, YAML in, `--set section.key=value` overrides.

config.py alone validates. Every error is a ConfigError whose one-line message names the key
(and the file when there is one) and the rule that was broken; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megads.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_DIR = CONFIG_DIR / "model"


@dataclass
class ModelConfig:
    """DeepSeek-V2/V3 architecture. Names follow the papers and the HF configs."""

    vocab_size: int = 32000
    hidden_size: int = 256  # d, the residual width
    intermediate_size: int = 1024  # SwiGLU width of the dense layers
    moe_intermediate_size: int = 256  # SwiGLU width of one routed (and shared) expert
    num_layers: int = 4
    first_k_dense: int = 1  # the first k layers use a dense MLP (first_k_dense_replace)
    num_heads: int = 4  # n_h
    attention: str = "mla"  # mla (latent attention, DeepSeek-V2) | mha (standard multi-head baseline, model/mha.py)
    q_lora_rank: int = 0  # query compression rank d_c'; 0 = a plain W_Q projection
    kv_lora_rank: int = 64  # key/value latent rank d_c
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # decoupled RoPE dims d_h^R (one shared rope key per token)
    v_head_dim: int = 32
    qk_head_dim: int = 0  # 0 = derived (nope + rope); if set it must equal their sum
    n_routed_experts: int = 8  # 0 = a dense model
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2  # K_r, routed experts per token
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups kept per token
    score_func: str = "sigmoid"  # sigmoid (V3) or softmax (V2)
    route_scale: float = 1.0  # routed_scaling_factor
    norm_topk_prob: bool = True  # normalise the chosen weights to sum 1 (V3); V2 leaves them
    router_bias: bool = True  # aux-loss-free balancing bias b_i (selection only)
    bias_update_speed: float = 0.001  # gamma in b_i += gamma * sign(mean_load - load_i)
    seq_aux_alpha: float = 0.0  # weight of the sequence-wise balance loss (0.0001 in V3)
    aux_loss_alpha: float = 0.0  # weight of the classic expert-level balance loss over a micro-batch's tokens (Switch/GShard, DeepSeek-V2); with router_bias false it replaces bias balancing
    mtp_depth: int = 0  # D multi-token-prediction modules
    mtp_lambda: float = 0.3  # MTP loss weight
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | yarn
    rope_factor: float = 1.0  # YaRN factor
    original_max_seq_len: int = 4096  # YaRN original_max_position_embeddings
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    cache_dtype: str = "bfloat16"  # dtype the KV-cache figures of model-info assume

    def validate(self, where: str = "model") -> None:
        _positive(self, where, ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                "max_seq_len", "n_group", "topk_group"])
        _nonneg(self, where, ["q_lora_rank", "n_routed_experts", "n_shared_experts", "first_k_dense",
                              "mtp_depth", "seq_aux_alpha", "bias_update_speed", "mtp_lambda"])
        if self.qk_rope_head_dim % 2:
            _bad(where, "qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.qk_head_dim and self.qk_head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            _bad(where, "qk_head_dim", f"must equal qk_nope_head_dim + qk_rope_head_dim = "
                 f"{self.qk_nope_head_dim + self.qk_rope_head_dim}, got {self.qk_head_dim}")
        if self.first_k_dense > self.num_layers:
            _bad(where, "first_k_dense", f"must be <= num_layers ({self.num_layers}), got {self.first_k_dense}")
        if self.score_func not in ("sigmoid", "softmax"):
            _bad(where, "score_func", f"must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.rope_scaling not in ("none", "yarn"):
            _bad(where, "rope_scaling", f"must be 'none' or 'yarn', got {self.rope_scaling!r}")
        if self.rope_factor < 1:
            _bad(where, "rope_factor", f"must be >= 1, got {self.rope_factor}")
        self._validate_baselines(where)
        if self.cache_dtype not in ("float32", "bfloat16", "float16", "int8", "float8"):
            _bad(where, "cache_dtype", f"must be one of float32, bfloat16, float16, int8, float8, got {self.cache_dtype!r}")
        if self.n_routed_experts > 0 and self.first_k_dense < self.num_layers:
            if self.moe_intermediate_size <= 0:
                _bad(where, "moe_intermediate_size", "must be > 0 when the model has routed experts")
            if self.num_experts_per_tok < 1:
                _bad(where, "num_experts_per_tok", f"must be >= 1, got {self.num_experts_per_tok}")
            if self.num_experts_per_tok > self.n_routed_experts:
                _bad(where, "num_experts_per_tok", f"must be <= n_routed_experts ({self.n_routed_experts}), "
                     f"got {self.num_experts_per_tok}")
            if self.n_routed_experts % self.n_group:
                _bad(where, "n_routed_experts", f"must be divisible by n_group ({self.n_group}), "
                     f"got {self.n_routed_experts}")
            if self.topk_group > self.n_group:
                _bad(where, "topk_group", f"must be <= n_group ({self.n_group}), got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                _bad(where, "num_experts_per_tok", f"must be <= topk_group x experts per group "
                     f"({self.topk_group} x {per_group}), got {self.num_experts_per_tok}")

    def _validate_baselines(self, where: str) -> None:
        """The comparison baselines of the paper-claim sweeps: MHA instead of MLA, and the classic
        auxiliary balance loss instead of (or beside) the balancing bias."""
        if self.attention not in ("mla", "mha"):
            _bad(where, "attention", f"must be 'mla' or 'mha', got {self.attention!r}")
        if self.aux_loss_alpha < 0:
            _bad(where, "aux_loss_alpha", f"must be >= 0, got {self.aux_loss_alpha}")

    @property
    def head_dim_qk(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense


@dataclass
class ParallelConfig:
    """Process layout. Data parallel = world / (tp * pp); experts fold over DP: EDP = DP*TP/EP."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size (stages; megads.parallel.pipeline)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved | zbv | dualpipev (torch.distributed.pipelining)
    vpp: int = 1  # virtual stages per pipeline rank (interleaved: any; zbv, dualpipev: 2)
    pp_layers: list = field(default_factory=list)  # blocks per (virtual) stage, in stage order; [] = even split
    ep: int = 1  # expert-parallel size
    sequence_parallel: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0, 1, 2)
    node_limit: int = 0  # node-limited routing: max EP "nodes" per token (0 = off)
    ranks_per_node: int = 0  # EP ranks per node for node-limited routing (0 = local world size)
    timeout_s: float = 600.0  # collective timeout; a lost rank fails the others within it
    backend: str = "auto"  # auto | gloo | nccl

    def validate(self, where: str = "parallel") -> None:
        _positive(self, where, ["tp", "pp", "ep", "timeout_s"])
        _nonneg(self, where, ["node_limit", "ranks_per_node"])
        if self.zero_stage not in (0, 1, 2, 3):
            _bad(where, "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.backend not in ("auto", "gloo", "nccl"):
            _bad(where, "backend", f"must be auto, gloo or nccl, got {self.backend!r}")
        _positive(self, where, ["vpp"])
        if self.pp_schedule not in ("1f1b", "interleaved", "zbv", "dualpipev"):
            _bad(where, "pp_schedule", f"must be 1f1b, interleaved, zbv or dualpipev, got {self.pp_schedule!r}")
        if self.pp_schedule == "1f1b" and self.vpp != 1:
            _bad(where, "vpp", f"must be 1 with pp_schedule 1f1b (virtual stages need 'interleaved', 'zbv' or "
                               f"'dualpipev'), got {self.vpp}")
        if self.pp_schedule in ("zbv", "dualpipev") and self.vpp != 2:
            _bad(where, "vpp", f"must be 2 with pp_schedule {self.pp_schedule} (two stages per rank, V-shaped), "
                               f"got {self.vpp}")
        if not isinstance(self.pp_layers, list) or not all(isinstance(n, int) and n >= 1 for n in self.pp_layers):
            _bad(where, "pp_layers", f"must be a list of positive block counts, one per stage, got {self.pp_layers!r}")
        if self.pp_layers and len(self.pp_layers) != self.pp * self.vpp:
            _bad(where, "pp_layers", f"has {len(self.pp_layers)} entries, need pp x vpp = {self.pp * self.vpp} "
                                     f"(one per stage)")


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpoints."""

    stage: str = "pretrain"  # pretrain | sft | dpo | distill | grpo: the objective the loop trains (megads/train/objectives)
    init_from: str = ""  # start from a megads model dir (a run's final/) or an HF DeepSeek dir; fresh optimizer
    max_steps: int = 100
    micro_batch_size: int = 4  # sequences per rank per micro step
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 mixed precision where this chip's bf16 matmul is measured faster) | fp32 | bf16
    threads: int = 0  # CPU threads per rank; 0: OMP_NUM_THREADS or torch's own choice, cores / local ranks when several share a node
    seed: int = 1234
    output_dir: str = "runs/default"
    save_interval: int = 50
    keep_last: int = 3  # complete checkpoints kept (older ones are removed after a new one is complete)
    save_on_signal: bool = True  # SIGTERM/SIGINT: finish the step, save, exit 143/130
    verify_on_resume: bool = True  # check every file's SHA-256 against the manifest before resuming
    async_save: bool = False  # DCP async_save: write checkpoints from a background thread (completed at the next save)
    eval_interval: int = 50
    eval_iters: int = 4  # validation: eval_iters batches of global_batch_size samples (the same in every layout)
    log_interval: int = 1
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (regional compilation); compile time is logged
    max_bad_steps: int = 5  # consecutive NaN/inf steps before training stops
    deepspeed_config: str = ""  # a user's own DeepSpeed JSON (overrides the generated one)
    samples_at_end: int = 3  # generated samples printed when training ends
    sample_tokens: int = 48
    tensorboard: bool = True
    progress: bool = True

    def validate(self, where: str = "train") -> None:
        _positive(self, where, ["max_steps", "micro_batch_size", "global_batch_size", "seq_len", "lr",
                                "save_interval", "eval_interval", "log_interval", "keep_last", "max_bad_steps"])
        _nonneg(self, where, ["min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_iters",
                              "samples_at_end", "sample_tokens"])
        if self.stage not in STAGES:
            _bad(where, "stage", f"must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            _bad(where, "precision", f"must be auto, fp32 or bf16, got {self.precision!r}")
        if self.threads < 0:
            _bad(where, "threads", f"must be >= 0 (0 = automatic), got {self.threads}")
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            _bad(where, "deepspeed_config", f"file not found: {self.deepspeed_config}")


@dataclass
class DataConfig:
    """Where the tokens come from."""

    paths: list = field(default_factory=list)  # indexed-dataset prefixes, optionally "weight prefix"
    tokenizer: str = ""  # tokenizer directory (tokenizer.json)
    builtin_corpus: bool = False  # build a corpus from this Python's stdlib sources/docs if missing
    data_dir: str = "data/builtin"  # where the builtin corpus, tokenizer and dataset are written
    vocab_size: int = 4096  # tokenizer size when megads trains one for the builtin corpus
    split: str = "98,2"  # train,valid shares of documents (of samples, for JSONL stages)
    num_workers: int = 0
    cache_dir: str = "data/cache"  # tokenised JSONL (sft): cached indexed datasets, reused when unchanged
    on_error: str = "skip"  # a malformed JSONL line: skip (logged as file:line) | fail

    def validate(self, where: str = "data") -> None:
        parts = str(self.split).split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 2 or any(v < 0 for v in vals) or sum(vals) <= 0:
            _bad(where, "split", f"must be 'train,valid' non-negative numbers, got {self.split!r}")
        if not self.paths and not self.builtin_corpus:
            pass  # a run without data is fine for model-info/generate; train checks itself
        if self.on_error not in ("skip", "fail"):
            _bad(where, "on_error", f"must be skip or fail, got {self.on_error!r}")


@dataclass
class SFTConfig:
    """Supervised fine-tuning (train.stage: sft)."""

    loss_on: str = "assistant"  # assistant (assistant/completion tokens only) | all
    packing: bool = True  # pack samples into rows with per-document attention (False: one per row, padded)

    def validate(self, where: str = "sft") -> None:
        if self.loss_on not in ("assistant", "all"):
            _bad(where, "loss_on", f"must be assistant or all, got {self.loss_on!r}")


@dataclass
class DPOConfig:
    """Preference tuning (train.stage: dpo)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    reference: str = "precomputed"  # precomputed (first pass, cached with the data) | resident (frozen copy)

    def validate(self, where: str = "dpo") -> None:
        _positive(self, where, ["beta"])
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            _bad(where, "loss_type", f"must be sigmoid, ipo or hinge, got {self.loss_type!r}")
        if self.reference not in ("precomputed", "resident"):
            _bad(where, "reference", f"must be precomputed or resident, got {self.reference!r}")


@dataclass
class DistillConfig:
    """Logit distillation from a frozen teacher (train.stage: distill) on SFT-format data."""

    teacher: str = ""  # a megads model dir or an HF DeepSeek dir (any size, the student's vocabulary)
    loss: str = "forward_kl"  # forward_kl (KL(teacher||student)) | reverse_kl | jsd
    temperature: float = 1.0
    beta: float = 0.5  # jsd: m = beta*teacher + (1-beta)*student; beta*KL(t||m) + (1-beta)*KL(s||m)

    def validate(self, where: str = "distill") -> None:
        _positive(self, where, ["temperature"])
        if self.loss not in ("forward_kl", "reverse_kl", "jsd"):
            _bad(where, "loss", f"must be forward_kl, reverse_kl or jsd, got {self.loss!r}")
        if not 0.0 < self.beta < 1.0:
            _bad(where, "beta", f"must be in (0, 1), got {self.beta}")


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimisation with rule rewards (train.stage: grpo). Each step samples
    `group_size` completions for each of global_batch_size / group_size prompts from the policy in
    its own layout, scores them, and trains on them (REFERENCE.md §6; megads/rl)."""

    group_size: int = 8  # G completions per prompt (global_batch_size = prompts per step x G)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list = field(default_factory=lambda: ["</answer>"])  # stop strings (EOS always stops)
    template: str = "r1-zero"  # r1-zero (REFERENCE.md §6, plain text) | chat (megads-chat-v1) | none (prompt as is)
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})  # name -> weight (megads.rl.rewards)
    lang: str = "en"  # target language of the language reward where a prompt has no `lang` field
    iterations: int = 1  # mu: optimizer steps on each rollout batch
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO: 0.28
    beta: float = 0.0  # k3 KL weight; 0: no reference model is built
    aggregation: str = "seq-mean-token-mean"  # | token-mean (DAPO) | seq-mean-token-sum-norm (Dr. GRPO)
    scale: str = "group"  # advantage scale: group std (GRPO) | batch std | none (Dr. GRPO)
    mask_truncated: bool = False  # completions cut at max_new_tokens add no loss
    drop_zero_std: bool = False  # groups whose rewards are all equal add no loss
    shuffle_rewards: bool = False  # control run: rewards permuted across the batch's completions
    reward_workers: int = 2  # threads scoring completions (the code reward's sandbox runs overlap)
    tasks: str = ""  # builtin task generator (megads.rl.tasks) when data.paths is empty
    eval_prompts: int = 128  # held-out prompts decoded greedily at each eval
    reward_modules: list = field(default_factory=list)  # modules imported first: they register their own rewards
    # rollouts and held-out sampling: auto (the faster decode step, measured) | train (the policy as
    # trained) | fp32 | bf16; another dtype than training's keeps a copy of this rank's weights
    rollout_precision: str = "auto"
    # how each decode step runs (megads.model.static): auto (a CUDA graph on CUDA where the model
    # allows it, else eager) | eager | static | compile (torch.compile'd once per process) | graph
    rollout_decode: str = "auto"
    # the log-prob forward computes each prompt once for the micro-batch's completions of it (rows
    # packed by prompt, megads.rl.pack) where that takes fewer FLOPs; false: every row whole
    share_prompts: bool = True

    def validate(self, where: str = "grpo") -> None:
        from megads.rl.loss import AGGREGATIONS

        _positive(self, where, ["group_size", "max_new_tokens", "iterations", "reward_workers"])
        _nonneg(self, where, ["temperature", "beta", "eps_low", "eps_high"])
        if not 0.0 < self.top_p <= 1.0:
            _bad(where, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.rollout_precision not in ("auto", "train", "fp32", "bf16"):
            _bad(where, "rollout_precision", f"must be auto, train, fp32 or bf16, got {self.rollout_precision!r}")
        if self.rollout_decode not in ("auto", "eager", "static", "compile", "graph"):
            _bad(where, "rollout_decode", f"must be auto, eager, static, compile or graph, got {self.rollout_decode!r}")
        if self.template not in ("r1-zero", "chat", "none"):
            _bad(where, "template", f"must be r1-zero, chat or none, got {self.template!r}")
        if self.aggregation not in AGGREGATIONS:
            _bad(where, "aggregation", f"must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.scale not in ("group", "batch", "none"):
            _bad(where, "scale", f"must be group, batch or none, got {self.scale!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.rewards.values()):
            _bad(where, "rewards", f"must map reward names to numeric weights, got {self.rewards!r}")
        if not all(isinstance(x, str) and x for x in self.stop):
            _bad(where, "stop", f"must be a list of non-empty strings, got {self.stop!r}")


@dataclass
class RejectionConfig:
    """`megads rejection-sample`: N completions per prompt from `checkpoint`, scored by the grpo
    section's rewards (template, stop strings, lang alike); a completion is kept when every reward
    in `require` reaches its threshold, up to `keep` distinct ones per prompt."""

    checkpoint: str = ""  # a megads model dir (final/), an HF dir, or a training checkpoint of this layout
    tasks: str = ""  # builtin task family or JSONL (default: grpo.tasks / data.paths[0])
    split: str = "train"  # train | test | all
    num_samples: int = 8  # N per prompt
    keep: int = 2  # K per prompt at most, after deduplication
    temperature: float = 0.8
    top_p: float = 1.0
    max_prompts: int = 0  # 0 = every prompt of the split
    prompts_per_batch: int = 8  # per data-parallel rank
    require: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0, "language": 0.95})
    output: str = ""  # chat JSONL; the stats go beside it (<output>.stats.json)
    seed: int = 0

    def validate(self, where: str = "rejection") -> None:
        _positive(self, where, ["num_samples", "keep", "prompts_per_batch"])
        _nonneg(self, where, ["temperature", "max_prompts"])
        if not 0.0 < self.top_p <= 1.0:
            _bad(where, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.split not in ("train", "test", "all"):
            _bad(where, "split", f"must be train, test or all, got {self.split!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.require.values()):
            _bad(where, "require", f"must map reward names to numeric thresholds, got {self.require!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.parallel.validate()
        self.train.validate()
        self.data.validate()
        self.sft.validate()
        self.dpo.validate()
        self.distill.validate()
        self.grpo.validate()
        self.rejection.validate()
        if self.train.stage == "grpo":
            g, t = self.grpo, self.train
            if t.global_batch_size % g.group_size:
                _bad("train", "global_batch_size", f"must be a multiple of grpo.group_size ({g.group_size}) "
                     f"for train.stage grpo, got {t.global_batch_size}")
            if g.temperature <= 0:
                _bad("grpo", "temperature", "must be > 0 for train.stage grpo (rollouts are sampled)")
            if g.max_new_tokens >= t.seq_len:
                _bad("grpo", "max_new_tokens", f"must be < train.seq_len ({t.seq_len}: prompt + completion), "
                     f"got {g.max_new_tokens}")
        decode = self.grpo.rollout_decode
        if decode in ("static", "compile", "graph"):  # megads.model.static.graph_support, known before any rank starts
            why = ("parallel.tp > 1" if self.parallel.tp > 1 else "parallel.ep > 1" if self.parallel.ep > 1
                   else "parallel.pp > 1" if self.parallel.pp > 1 else "model.attention mha"
                   if self.model.attention == "mha" else None)
            if why:
                _bad("grpo", "rollout_decode", f"{decode} needs the whole MLA model in each process, not {why}; "
                     f"use auto or eager")
            if decode == "graph":
                import torch

                if not torch.cuda.is_available():
                    _bad("grpo", "rollout_decode", "graph needs CUDA, and torch sees no GPU; use auto")
        if self.train.stage == "distill" and not self.distill.teacher:
            _bad("distill", "teacher", "train.stage distill needs a teacher model directory")
        if self.model.num_heads % self.parallel.tp:
            _bad("parallel", "tp", f"must divide model.num_heads ({self.model.num_heads}), got {self.parallel.tp}")
        if self.model.n_routed_experts and self.model.n_routed_experts % self.parallel.ep:
            _bad("parallel", "ep", f"must divide model.n_routed_experts ({self.model.n_routed_experts}), "
                 f"got {self.parallel.ep}")
        pa = self.parallel
        if pa.pp > 1 or pa.vpp > 1:
            stages = pa.pp * pa.vpp
            if pa.pp_layers and sum(pa.pp_layers) != self.model.num_layers:
                _bad("parallel", "pp_layers", f"sums to {sum(pa.pp_layers)} blocks, model.num_layers is "
                                              f"{self.model.num_layers}")
            if stages > self.model.num_layers:
                _bad("parallel", "pp", f"pp x vpp = {stages} stages for {self.model.num_layers} blocks "
                                       f"(model.num_layers): every stage needs a block")
            if pa.zero_stage > 1:
                _bad("parallel", "zero_stage", f"{pa.zero_stage} with parallel.pp {pa.pp}: ZeRO-2/3 reduce gradients "
                     f"in backward hooks the pipeline schedule does not drive; use zero_stage 0 or 1")
            if self.train.stage == "grpo":
                _bad("train", "stage", f"grpo with parallel.pp {pa.pp}: rollouts under pipeline parallelism are not "
                     f"supported yet; use pp: 1 (TP/EP/DP)")
        if self.train.seq_len > self.model.max_seq_len:
            _bad("train", "seq_len", f"must be <= model.max_seq_len ({self.model.max_seq_len}), got {self.train.seq_len}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig,
            "sft": SFTConfig, "dpo": DPOConfig, "distill": DistillConfig,
            "grpo": GRPOConfig, "rejection": RejectionConfig}
STAGES = ("pretrain", "sft", "dpo", "distill", "grpo")


# ---------------------------------------------------------------- helpers

def _bad(where: str, key: str, rule: str):
    raise ConfigError(f"{where}.{key}: {rule}")


def _positive(obj, where, keys):
    for k in keys:
        if getattr(obj, k) <= 0:
            _bad(where, k, f"must be > 0, got {getattr(obj, k)}")


def _nonneg(obj, where, keys):
    for k in keys:
        if getattr(obj, k) < 0:
            _bad(where, k, f"must be >= 0, got {getattr(obj, k)}")


def _check_type(value: Any, tp: Any, name: str, src: str) -> Any:
    """Return value coerced to the field type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if base is list and isinstance(value, str) and value:
            return [value]  # `--set data.paths=x.jsonl`: a list of one
        if not isinstance(value, base):
            raise ConfigError(f"{src}{name}: expected a {base.__name__}, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{src}{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):  # YAML 1.1 reads 2e-4 as a string
            return float(value)
        raise ConfigError(f"{src}{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{src}{name}: expected a string, got {value!r}")
    return value


def _fill(section_obj, mapping: dict, where: str, src: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in mapping.items():
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:4])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{src}{where}.{key}: unknown key{hint}")
        setattr(section_obj, key, _check_type(value, hints[key], f"{where}.{key}", src))


def read_yaml(path: Path) -> dict:
    """A YAML mapping from a file; ConfigError (naming file and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = PRESET_DIR / f"{name}.yaml"
    if not cand.is_file():
        known = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"model preset {name!r} not found (known: {known})")
    return cand


def load_model_preset(name: str) -> ModelConfig:
    path = preset_path(name)
    cfg = ModelConfig()
    _fill(cfg, read_yaml(path), "model", f"{path}: ")
    cfg.validate()
    return cfg


_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_override(item: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected section.key=value")
    lhs, rhs = item.split("=", 1)
    if "." not in lhs:
        raise ConfigError(f"--set {item}: key must be section.key (sections: {', '.join(SECTIONS)})")
    section, key = lhs.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"--set {lhs}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(rhs) if rhs.strip() != "" else ""
    except yaml.YAMLError:
        value = rhs
    return section, key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from a run YAML (or a model preset name/YAML) plus --set overrides.

    A run YAML has sections model/parallel/train/data. `model` may be a preset name
    (`model: tiny`) or a mapping with an optional `preset:` key and field overrides.
    """
    cfg = Config()
    src = ""
    if path is not None:
        p = Path(path)
        if not p.is_file() and (PRESET_DIR / f"{path}.yaml").is_file():
            p = PRESET_DIR / f"{path}.yaml"
        data = read_yaml(p)
        src = f"{p}: "
        if not data:
            raise ConfigError(f"{p}: empty config (a run YAML has sections {', '.join(SECTIONS)}; "
                              f"a model preset has model fields)")
        if _is_bare_preset(data, p):
            data = {"model": data}  # a bare model preset
        for section, body in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{src}{section}: unknown section{_did_you_mean(section, SECTIONS)} "
                                  f"(sections: {', '.join(SECTIONS)})")
            if section == "model":
                if isinstance(body, str):
                    cfg.model = load_model_preset(body)
                    continue
                body = dict(body or {})
                if "preset" in body:
                    cfg.model = load_model_preset(str(body.pop("preset")))
            if not isinstance(body, dict):
                raise ConfigError(f"{src}{section}: expected a mapping, got {type(body).__name__}")
            _fill(getattr(cfg, section), body, section, src)
    for item in overrides or []:
        section, key, value = parse_override(item)
        if section == "model" and key == "preset":
            cfg.model = load_model_preset(str(value))
            continue
        _fill(getattr(cfg, section), {key: value}, section, "--set ")
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(_blame(str(e), src, overrides or [])) from None


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_bare_preset(data: dict, path: Path) -> bool:
    """Whether a YAML without run sections is a bare model preset: a file of the preset dir, or
    one holding model fields or plain values. A mapping under an unknown name is a misspelled
    section (`trian:`), said as such, not blamed on `model.trian`."""
    if path.parent.resolve() == PRESET_DIR.resolve():
        return True
    if set(data) & set(SECTIONS):
        return False
    if set(data) & {f.name for f in dataclasses.fields(ModelConfig)}:
        return True
    for key, value in data.items():
        if isinstance(value, dict) or value is None:
            raise ConfigError(f"{path}: {key}: unknown section{_did_you_mean(key, SECTIONS)} "
                              f"(sections: {', '.join(SECTIONS)})")
    return True


def _blame(msg: str, src: str, overrides: list[str]) -> str:
    """Whom a validation error `section.key: rule` belongs to: the `--set` that set that key (or a
    key the rule names), else the file, naming the overrides applied on top of it."""
    key = msg.split(":", 1)[0].strip()
    rule = msg.split(":", 1)[1] if ":" in msg else ""

    def lhs(item: str) -> str:
        return item.split("=", 1)[0].strip()

    mine = [o for o in overrides if lhs(o) == key]
    mine = mine or [o for o in overrides if re.search(rf"\b{re.escape(lhs(o).split('.')[-1])}\b", rule)]
    if mine:
        return f"--set {mine[-1]}: {msg}"
    if overrides:
        return f"{src}{msg} (with --set {', '.join(overrides)})"
    return f"{src}{msg}"


def model_config_from_dict(d: dict) -> ModelConfig:
    cfg = ModelConfig()
    _fill(cfg, d, "model", "")
    cfg.validate()
    return cfg
