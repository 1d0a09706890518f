"""The DeepSeek-V3 decoder: embedding, blocks of MLA + (dense MLP | DeepSeekMoE), MTP, head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megads.config import ModelConfig
from megads.model.cache import MLACache
from megads.model.mha import MHA
from megads.model.mla import MLA, SharedPrefixMask
from megads.model.moe import MLP, MoE
from megads.model.norm import RMSNorm
from megads.model.rope import RotaryEmbedding
from megads.parallel.tensor import (ColumnParallelLinear, VocabParallelEmbedding, gather_from_sp, gather_from_tp,
                                    group_rank, group_size, normal_init_, vocab_parallel_cross_entropy)


@dataclass
class LMOutput:
    loss: torch.Tensor  # lm_loss + mtp_lambda * mtp_loss + aux_loss
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor
    num_tokens: torch.Tensor  # label tokens counted in lm_loss
    token_losses: torch.Tensor | None = None  # [B, S] per-token cross-entropy (0 where ignored), on request
    logits: torch.Tensor | None = None  # [B, S, V/tp] this rank's vocab shard of the logits, on request


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, S] (-1 = padding) -> bool [B, 1, S, S]: causal within each document only."""
    S = doc_ids.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return (causal & same & (doc_ids >= 0).unsqueeze(-2)).unsqueeze(1)


def mtp_targets(labels: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The labels MTP depth k predicts from positions [0, S-k): labels[i+k], ignored (-100) where
    position i+k lies in another document than i."""
    S = labels.shape[1]
    tgt = labels[:, k:]
    if doc_ids is not None:
        tgt = tgt.masked_fill(doc_ids[:, :S - k] != doc_ids[:, k:], -100)
    return tgt


def loss_token_counts(labels: torch.Tensor, mtp_depth: int = 0, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [1 + mtp_depth]: label tokens the LM loss and each MTP depth count in a batch
    (the denominators of a loss normalised over a global batch)."""
    out = [(labels != -100).sum()]
    for k in range(1, mtp_depth + 1):
        out.append((mtp_targets(labels, k, doc_ids) != -100).sum() if k < labels.shape[1]
                   else labels.new_zeros(()))
    return torch.stack(out).double()


class Block(nn.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool, par: dict):
        super().__init__()
        self.layer_id = layer_id
        sp = par.get("sequence_parallel", False)
        sp_group = par.get("tp_group") if sp else None
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sp_group)
        # model.attention: DeepSeek's latent attention, or the standard multi-head baseline
        self.attn = (MHA if cfg.attention == "mha" else MLA)(cfg, par.get("tp_group"), sp)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sp_group)
        if moe:
            self.ffn = MoE(cfg, par.get("tp_group"), sp, dispatcher=par.get("dispatcher"),
                           num_local_experts=par.get("num_local_experts"),
                           token_split=par.get("moe_token_split", False), node_limit=par.get("node_limit"))
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size, cfg, par.get("tp_group"), sp)
        self.is_moe = moe

    def forward(self, h, cos, sin, cache=None, start=0, attn_mask=None, naive=False, token_mask=None,
                seq_groups=None):
        h = h + self.attn(self.attn_norm(h), cos, sin, cache, start, attn_mask, naive)
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(h), token_mask, seq_groups)
        else:
            y, aux = self.ffn(self.ffn_norm(h)), h.new_zeros((), dtype=torch.float32)
        return h + y, aux


class MTPModule(nn.Module):
    """Multi-token prediction depth k: h' = W [RMSNorm(h_prev); RMSNorm(Emb(t_{i+k}))], one block,
    then its own final norm; embedding and output head are the main model's."""

    def __init__(self, cfg: ModelConfig, depth: int, par: dict):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        normal_init_(self.eh_proj.weight, cfg.init_std)
        self.eh_proj.param_init = {"weight": cfg.init_std}
        self.block = Block(cfg, cfg.num_layers + depth, cfg.n_routed_experts > 0, par)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev, emb, cos, sin, attn_mask=None, token_mask=None):
        x = self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(emb)], dim=-1))
        h, aux = self.block(x, cos, sin, attn_mask=attn_mask, token_mask=token_mask)
        return h, aux


class LayerSlice(nn.Module):
    """Some of the decoder blocks, registered under their global index (parameter names
    `layers.<i>.` as in the full model); iterates over the blocks in index order."""

    def __init__(self, blocks: dict):
        super().__init__()
        for i in sorted(blocks):
            self.add_module(str(i), blocks[i])

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i: int):
        return self._modules[str(i)]

    def ids(self) -> list[int]:
        return [int(k) for k in self._modules]


class Transformer(nn.Module):
    """`forward(tokens)` -> logits [B, S, V] float32; `forward(tokens, labels)` -> LMOutput.

    `par` (from megads.parallel) carries the TP group, sequence parallelism and the expert
    dispatcher; without it the model is the plain single-device math.

    A pipeline rank builds a part of the model: `layers` (global block indices; None = all),
    `embed` (the embedding: the first stage, and the last one where MTP or a tied head reads it)
    and `head` (final norm, output head, MTP modules: the last stage). Parameter names are those of
    the full model, so a part's state dict is a subset of the full one.
    """

    def __init__(self, cfg: ModelConfig, par: dict | None = None, layers=None, embed: bool = True,
                 head: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        par = dict(par or {})
        self.par = par
        self.tp_group = par.get("tp_group")
        self.sequence_parallel = bool(par.get("sequence_parallel")) and group_size(self.tp_group) > 1
        if self.sequence_parallel and cfg.mtp_depth:
            raise ValueError("sequence parallelism with multi-token prediction is not supported yet")
        self.activation_checkpointing = False
        ids = range(cfg.num_layers) if layers is None else sorted(layers)
        self.is_full = layers is None and embed and head
        if head and cfg.tie_embeddings:
            embed = True
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group=self.tp_group,
                                            std=cfg.init_std) if embed else None
        self.rope = RotaryEmbedding(cfg)
        self.layers = LayerSlice({i: Block(cfg, i, cfg.is_moe_layer(i), par) for i in ids})
        self.norm = self.head = None
        self.mtp = nn.ModuleList()
        if head:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.tp_group if self.sequence_parallel else None)
            self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, tp_group=self.tp_group,
                                             std=cfg.init_std)
            self.mtp = nn.ModuleList(MTPModule(cfg, k + 1, par) for k in range(cfg.mtp_depth))
            if cfg.tie_embeddings:
                self.head.weight = self.embed.weight

    # ---------------------------------------------------------------- helpers
    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main blocks first, then MTP blocks (the bias-update order)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if b.is_moe]

    def moe_layer_ids(self) -> list[int]:
        """The block index of each of `moe_layers()` (MTP blocks: num_layers + depth)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.layer_id for b in blocks if b.is_moe]

    def expert_counts(self) -> torch.Tensor | None:
        """[L_moe, E] tokens per expert of the last forward (None for a dense model)."""
        layers = self.moe_layers()
        if not layers or layers[0].last_counts is None:
            return None
        return torch.stack([m.last_counts.float() for m in layers])

    @torch.no_grad()
    def update_router_biases(self, counts: torch.Tensor) -> None:
        """Apply the aux-loss-free bias update with the step's global counts [L_moe, E]."""
        for m, c in zip(self.moe_layers(), counts):
            m.update_bias(c)

    def compile_blocks(self, **options) -> int:
        """Regional compilation (as torchtitan): every transformer block, main and MTP, through
        torch.compile in place; the embedding, head, losses and the loop stay eager. The MoE ops
        trace as custom ops with fake kernels: the ops backend is loaded first, so that loading it
        does not break the graph. Returns the number of blocks."""
        from megads import ops

        ops.backend()
        blocks = list(self.layers) + [m.block for m in self.mtp]
        for b in blocks:
            b.compile(**options)
        return len(blocks)

    def _embed(self, tokens):
        h = self.embed(tokens)
        if self.sequence_parallel:  # enter the sequence-parallel region: keep our sequence chunk
            from megads.parallel.tensor import scatter_to_tp

            h = scatter_to_tp(h, self.tp_group, dim=1)
        return h

    def _run_block(self, block, h, cos, sin, **kw):
        if self.activation_checkpointing and self.training and not kw.get("cache"):
            return checkpoint(block, h, cos, sin, use_reentrant=False, **kw)  # masks included
        return block(h, cos, sin, **kw)

    def _logits(self, h):
        if self.sequence_parallel:
            # the head's own copy_to_tp already sums the vocab shards' gradients, so the gather's
            # backward is a split (a reduce-scatter would count them tp times)
            h = gather_from_tp(h, self.tp_group, dim=1)
        return self.head(h)  # [B, S, V/tp]

    def _ce(self, logits_local, labels):
        """Per-token loss [N] without gathering the full vocabulary. The logits are the head's
        temporary: on one rank their storage becomes their gradient in the backward."""
        V_local = logits_local.shape[-1]
        return vocab_parallel_cross_entropy(logits_local.reshape(-1, V_local), labels.reshape(-1),
                                            tp_group=self.tp_group,
                                            vocab_start=group_rank(self.tp_group) * V_local, owned=True)

    # ---------------------------------------------------------------- forward
    def forward(self, tokens, labels=None, positions=None, cache: MLACache | None = None, attention_mask=None,
                naive: bool = False, doc_ids=None, num_items=None, token_losses: bool = False,
                local_logits: bool = False, temperature: float = 1.0, loss_from: int = 0, stage: dict | None = None,
                cache_index: torch.Tensor | None = None, logits_to_keep: int = 0,
                shared_prefix: tuple[int, int] | None = None):
        """tokens [B, S] int64. labels [B, S] (next tokens, -100 = ignore) gives an LMOutput.

        positions [B, S] (default 0..S-1, offset by the cache length); attention_mask [B, T] of
        kept keys (T = cache length + S with a cache, S without) for left-padded batches.
        doc_ids [B, S] (training, packed samples; -1 = padding): attention stays inside each
        document. num_items [1 + mtp_depth]: divide the summed LM and MTP losses by these (the
        global batch's token counts per micro-batch share) instead of taking per-batch means.
        token_losses: also return the per-token cross-entropy [B, S] (vocab-parallel, with
        gradient; for sequence log-probs, e.g. DPO), skip the MTP losses, and make `loss` the MoE
        balance term alone (with its gradient). local_logits (no labels): an LMOutput whose `logits`
        are this rank's vocab shard [B, S, V/tp] (distillation without gathering the vocabulary)
        and whose `loss` is the balance term. temperature: the main head's cross-entropy is taken on
        logits / temperature (the sampling distribution of an RL rollout). loss_from (with
        token_losses): the output head runs on positions loss_from.. only, and token_losses is
        [B, S - loss_from] (an RL batch's completion, without the prompt's vocabulary-wide logits).

        stage (pipeline parallelism, megads.parallel.pipeline): run one pipeline stage of the call
        above: {"h": the previous stage's hidden states (None on the first stage), "aux": its
        running balance loss, "layers": the block indices of this stage, "last": whether it ends
        the model}. A stage that is not the last returns (h, balance loss so far); the last one
        returns what the call returns, its balance loss including the earlier stages'.

        cache_index (with a cache, one token per row, positions and attention_mask [B, max_len]
        given): a long tensor [1] on the device, the cache position to write; attention runs over
        the whole cache under the mask and `cache.length` is left to the caller. Every shape and
        host-side argument is then the same at each step (megads.model.static: CUDA graphs,
        compilation without recompiles).

        logits_to_keep (no labels): the output head runs on the last this many positions only and
        the logits are [B, logits_to_keep, V] (0: every position). A generation's prefill needs
        the last position's alone: the head is the largest product of a small model's prefill.

        shared_prefix (prefix, group), with token_losses and attention_mask [B, S] of kept keys: each
        row holds `group` sequences that begin with the same `prefix` tokens, laid out as [prefix |
        the group's continuations, (S - prefix) / group positions each] (an RL batch's completions
        of one prompt: megads.rl.pack). A continuation attends to the prefix and to itself, so its
        log-probs are those of the sequence [prefix | continuation] alone, while the prefix is
        computed once instead of `group` times; the balance statistics (expert loads, balance
        losses) count each sequence whole, as the unpacked rows would.
        """
        B, S = tokens.shape
        start = cache.length if cache is not None else 0
        if cache_index is not None:
            if cache is None or positions is None:
                raise ValueError("cache_index needs a cache and explicit positions")
            start = cache_index
        naive = naive or bool(cache is not None and cache.naive)
        if positions is None:
            positions = torch.arange(start, start + S, device=tokens.device)
        token_mask = None
        layer_kw = {}
        if shared_prefix is not None:
            prefix, group = shared_prefix
            if (cache is not None or doc_ids is not None or stage is not None or not token_losses
                    or attention_mask is None or attention_mask.dim() != 2 or self.sequence_parallel
                    or group < 1 or prefix < 0 or (S - prefix) % group):
                raise ValueError("shared_prefix: for token_losses on rows [prefix | group equal segments] with a "
                                 "[B, S] attention_mask, without cache, doc_ids, pipeline stages or sequence "
                                 f"parallelism (prefix {prefix}, group {group}, S {S})")
            keep = attention_mask.bool()
            attention_mask = SharedPrefixMask(keep, prefix, group)
            # each prefix position stands for `group` sequences' positions in the expert loads
            token_mask = keep.to(torch.float32)
            token_mask[:, :prefix] *= group
            layer_kw["seq_groups"] = (prefix, group)
        elif doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids is for training on packed rows, not for cached generation")
            attention_mask = document_mask(doc_ids)
            token_mask = doc_ids >= 0  # padding: not counted in the expert loads
        elif attention_mask is not None and cache is None and attention_mask.dim() == 2:
            token_mask = attention_mask.bool()  # padded rows (RL rollouts): padding not counted either
        blocks = list(self.layers)
        if stage is not None:
            h = self._embed(tokens) if stage["h"] is None else stage["h"]
            blocks = [self.layers[i] for i in stage["layers"]]
        else:
            h = self._embed(tokens)
        # full-sequence rope tables: under sequence parallelism MLA gathers the sequence first
        cos, sin = self.rope(positions, h.dtype)
        aux_total = h.new_zeros((), dtype=torch.float32)
        if stage is not None and stage["aux"] is not None:
            aux_total = aux_total + stage["aux"].reshape(())
        for i, block in enumerate(blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            kw = {"token_mask": token_mask, **layer_kw} if token_mask is not None else {}
            h, aux = self._run_block(block, h, cos, sin, cache=layer_cache, start=start,
                                     attn_mask=attention_mask, naive=naive, **kw)
            aux_total = aux_total + aux
        if stage is not None and not stage["last"]:
            return h, aux_total
        if cache is not None and cache_index is None:
            cache.advance(S)
        hn = self.norm(h)
        if local_logits:
            zero = h.new_zeros((), dtype=torch.float32)
            return LMOutput(aux_total, zero, zero, aux_total.detach(), tokens.new_zeros(()), None, self._logits(hn))
        if labels is None:
            if logits_to_keep and not self.sequence_parallel:  # (sequence-parallel: gathered first)
                hn = hn[:, -logits_to_keep:]
            logits = self._logits(hn)
            if logits_to_keep and self.sequence_parallel:
                logits = logits[:, -logits_to_keep:]
            return gather_from_tp(logits, self.tp_group).float()
        if loss_from:
            if not token_losses or self.sequence_parallel:
                raise ValueError("loss_from is for token_losses without sequence parallelism")
            hn, labels = hn[:, loss_from:], labels[:, loss_from:]
        logits = self._logits(hn)
        losses = self._ce(logits if temperature == 1.0 else logits / temperature, labels)
        valid = (labels.reshape(-1) != -100)
        n = valid.sum()
        lm_loss = losses.sum() / (n.clamp_min(1) if num_items is None else num_items[0])
        mtp_loss = h.new_zeros((), dtype=torch.float32)
        if self.mtp and not token_losses:
            mtp_loss, mtp_aux = self._mtp_loss(h, labels, positions, tokens, attention_mask, doc_ids, num_items)
            aux_total = aux_total + mtp_aux
        loss = lm_loss + self.cfg.mtp_lambda * mtp_loss + aux_total
        per_token = None
        if token_losses:  # the caller builds its own loss from these; `loss` is the balance term alone
            per_token = losses.view(B, S - loss_from).masked_fill(labels == -100, 0.0)
            loss = aux_total
        return LMOutput(loss, lm_loss.detach(), mtp_loss.detach(), aux_total.detach(), n, per_token)

    def _mtp_loss(self, h, labels, positions, tokens, attention_mask=None, doc_ids=None, num_items=None):
        """Depth k predicts t_{i+k+1} (= labels[i+k]) from h^{k-1}_i and Emb(t_{i+k}) (= tokens[i+k],
        read from the tokens: an ignored label (-100, e.g. a masked prompt) still has its token).

        Returns (mean MTP loss over the depths, their balance losses)."""
        S = labels.shape[1]
        total = h.new_zeros((), dtype=torch.float32)
        aux_total = h.new_zeros((), dtype=torch.float32)
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            L = S - k
            if L <= 0:
                break
            inp = tokens[:, k:k + L]
            tgt = mtp_targets(labels, k, doc_ids)
            emb = self.embed(inp)
            pos = positions[..., :L]
            cos, sin = self.rope(pos, h.dtype)
            if doc_ids is not None:  # the documents' causal mask over the first L positions
                mask = attention_mask[:, :, :L, :L]
            else:
                mask = attention_mask[:, :L].bool() if attention_mask is not None else None  # left padding
                if mask is not None:  # no MTP target from a padding position's hidden state
                    tgt = tgt.masked_fill(~mask, -100)
            # counted in the expert loads: positions whose depth-k target is in their own document
            # (the same set however the documents are laid out in rows)
            tmask = ((doc_ids[:, :L] >= 0) & (doc_ids[:, :L] == doc_ids[:, k:k + L])) if doc_ids is not None else None
            hk, aux = module(h_prev[:, :L], emb, cos, sin, mask, token_mask=tmask)
            aux_total = aux_total + aux
            logits = self.head(module.norm(hk))
            losses = self._ce(logits, tgt)
            denom = (tgt != -100).sum().clamp_min(1) if num_items is None else num_items[k]
            total = total + losses.sum() / denom
            h_prev = hk
        return total / len(self.mtp), aux_total

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, tokens, max_new_tokens=32, temperature=0.0, top_p=1.0, **kw):
        """Batched KV-cached sampling on the absorbed path; see megads.model.generate."""
        from megads.model.generate import generate

        return generate(self, tokens, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, **kw)

