"""The GRPO loss and group advantages as plain functions (DeepSeekMath / DeepSeek-R1, DAPO,
Dr. GRPO; formulas in ../shared/REFERENCE.md §6).

Per completion token t of completion i, with ρ = exp(logp − old_logp) and the advantage A_i:

    surrogate  l = −min(ρ·A, clip(ρ, 1 − eps_low, 1 + eps_high)·A)
    k3 KL      k = exp(ref − logp) − (ref − logp) − 1        (≥ 0; added to the loss times beta)
    per token  l + beta·k

Aggregations over the completion tokens (mask = 1 on tokens that count):

    seq-mean-token-mean      (GRPO)     Σ_i (Σ_t l_it / |o_i|) / num_sequences
    token-mean               (DAPO)     Σ_it l_it / num_tokens
    seq-mean-token-sum-norm  (Dr. GRPO) Σ_it l_it / (num_sequences · max_tokens)

`num_sequences` / `num_tokens` default to this batch's; the trainer passes the global batch's
(every data-parallel rank and micro-batch), so the loss is the one mean over the whole batch, not
a mean of per-rank means. `max_tokens` is the generation budget (max new tokens), a constant.
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [B·G] (the G completions of a prompt adjacent; NaN = cannot judge) ->
    (advantages [B·G], zero_std [B] groups whose judged rewards are all equal).

    A = r − mean(group); divided by std(group) + eps (scale "group", GRPO), by the std over the
    whole batch + eps ("batch"), or not at all ("none", Dr. GRPO). Means and (unbiased, as TRL)
    standard deviations are taken over the judged rewards only; an unjudged completion gets A = 0.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    r = rewards.reshape(-1, G).to(torch.float64)
    judged = ~torch.isnan(r)
    n = judged.sum(-1, keepdim=True)
    r0 = torch.where(judged, r, torch.zeros_like(r))
    mean = r0.sum(-1, keepdim=True) / n.clamp_min(1)
    dev = torch.where(judged, r - mean, torch.zeros_like(r))
    var = (dev ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    std = var.sqrt()
    zero_std = (std.squeeze(-1) <= 1e-12) | (n.squeeze(-1) < 2)
    if scale == "group":
        dev = dev / torch.where(zero_std.unsqueeze(-1), torch.ones_like(std), std + eps)  # (dev is 0 there)
    elif scale == "batch":
        flat = r[judged]
        bstd = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        dev = dev / (bstd + eps) if bstd + eps > 0 else dev
    return dev.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32), zero_std


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.0, aggregation: str = "seq-mean-token-mean", num_sequences=None,
              num_tokens=None, max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """logp, old_logp, ref_logp, mask [B, T] (per completion token); advantages [B].

    Returns (loss, stats) with stats (detached, over the masked tokens of this batch):
    clip_low (share with ρ < 1 − eps_low and A < 0: the low clip binds), clip_high (ρ > 1 + eps_high
    and A > 0), kl (k3 mean; 0 without a reference), ratio (ρ mean). Sums for exact global means
    are in stats["sums"] = [tokens, clip_low, clip_high, kl, ratio].
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    m = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = per_token * m
    B, T = logp.shape
    if aggregation == "seq-mean-token-mean":
        seq = per_token.sum(-1) / m.sum(-1).clamp_min(1.0)
        loss = seq.sum() / (B if num_sequences is None else num_sequences)
    elif aggregation == "token-mean":
        loss = per_token.sum() / (m.sum().clamp_min(1.0) if num_tokens is None else num_tokens)
    else:
        L = T if max_tokens is None else max_tokens
        loss = per_token.sum() / ((B if num_sequences is None else num_sequences) * L)
    with torch.no_grad():
        n = m.sum()
        low = ((ratio < 1.0 - eps_low) & (A < 0)).to(m.dtype) * m
        high = ((ratio > 1.0 + eps_high) & (A > 0)).to(m.dtype) * m
        kl_sum = (kl * m).sum() if kl is not None else n.new_zeros(())
        sums = torch.stack([n, low.sum(), high.sum(), kl_sum, (ratio * m).sum()]).double()
        d = n.clamp_min(1.0)
        stats = {"clip_low": low.sum() / d, "clip_high": high.sum() / d, "kl": kl_sum / d,
                 "ratio": (ratio * m).sum() / d, "sums": sums}
    return loss, stats
