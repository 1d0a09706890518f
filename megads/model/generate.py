"""Batched, KV-cached sampling on the absorbed MLA path.

Prompts of different lengths come left-padded (attention_mask, or pad_token_id to derive it):
each row's positions start at 0 at its first real token. Greedy at temperature 0; otherwise
temperature + nucleus (top-p) sampling. Rows that emit a stop token are finished and padded.
"""
from __future__ import annotations

import torch

from megads.model.cache import MLACache


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] float32 -> next tokens [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first is always kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens=(), attention_mask: torch.Tensor | None = None,
             pad_token_id: int | None = None, cache_quant: str | None = None, naive: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """tokens int64 [B, S] (left-padded) -> [B, S + max_new_tokens].

    Finished rows (a stop token was produced) are filled with pad_token_id (or their stop token).
    """
    was_training = model.training
    model.eval()
    B, S = tokens.shape
    device = tokens.device
    if attention_mask is None:
        attention_mask = (tokens != pad_token_id) if pad_token_id is not None else torch.ones_like(tokens, dtype=torch.bool)
    mask = torch.zeros(B, S + max_new_tokens, dtype=torch.bool, device=device)
    mask[:, :S] = attention_mask.bool()
    positions = (mask[:, :S].long().cumsum(-1) - 1).clamp_min(0)
    dtype = next(model.parameters()).dtype
    cache = MLACache(model.cfg, B, S + max_new_tokens, dtype=dtype, device=device, quant=cache_quant, naive=naive)
    out = torch.empty(B, S + max_new_tokens, dtype=tokens.dtype, device=device)
    out[:, :S] = tokens
    stop = torch.tensor(list(stop_tokens), dtype=tokens.dtype, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    fill = pad_token_id if pad_token_id is not None else (int(stop[0]) if len(stop) else 0)
    logits = model(tokens, positions=positions, cache=cache, attention_mask=mask[:, :S], naive=naive)[:, -1]
    next_pos = positions[:, -1] + 1
    n_done = 0
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
        out[:, S + t] = nxt
        n_done = t + 1
        if len(stop):
            finished |= torch.isin(nxt, stop)
            if bool(finished.all()):
                break
        if t == max_new_tokens - 1:
            break
        mask[:, S + t] = True
        logits = model(nxt.unsqueeze(1), positions=next_pos.unsqueeze(1), cache=cache,
                       attention_mask=mask[:, :S + t + 1], naive=naive)[:, -1]
        next_pos = next_pos + 1
    if n_done < max_new_tokens:
        out[:, S + n_done:] = fill
    model.train(was_training)
    return out
