"""Batched, KV-cached sampling on the absorbed MLA path.

The cache is allocated once for the prompt plus max_new_tokens; the loop reads nothing back to the
host except, every `finish_check` steps, whether all rows have finished (and a stop_fn's own
reads, e.g. decoding a stop string's candidates).

Prompts of different lengths come left-padded (attention_mask, or pad_token_id to derive it):
each row's positions start at 0 at its first real token. Greedy at temperature 0; otherwise
temperature + nucleus (top-p) sampling. Rows that emit a stop token (or that `stop_fn` says
have finished, e.g. on a stop string) are finished and padded.

For RL rollouts (`return_logprobs`) the sampler also returns each sampled token's log-prob under
the temperature-scaled distribution (log_softmax(logits / T), before top-p truncation: the
distribution the trainer recomputes) and that distribution's entropy. With `sync`, every rank of
the process group runs the same number of forward passes (the "all rows finished" test is agreed
by one all-reduce), which tensor- and expert-parallel ranks decoding in lockstep need.
"""
from __future__ import annotations

import torch

from megads.model.cache import new_cache


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] float32 -> next tokens [B].

    generator: one torch.Generator for the batch, or a list of one per row: each row then draws
    its own uniform number and takes the inverse CDF of its distribution, so a row's sample does
    not depend on which other rows share the batch (RL rollouts give the same completions in any
    parallel layout)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first is always kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generator]).to(probs.device)
        cdf = probs.double().cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # never a zero-probability token (u at a float boundary)
        idx = idx.clamp_max(probs.shape[-1] - 1)
        bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
        return torch.where(bad, probs.argmax(-1), idx)  # no host read of `bad`
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens=(), attention_mask: torch.Tensor | None = None,
             pad_token_id: int | None = None, cache_quant: str | None = None, naive: bool = False,
             generator: torch.Generator | None = None, return_logprobs: bool = False, stop_fn=None,
             sync: bool = False, finish_check: int | None = None, decode: str = "auto",
             share_prompts: bool = True):
    """tokens int64 [B, S] (left-padded) -> [B, S + max_new_tokens].

    Finished rows (a stop token was produced) are filled with pad_token_id (or their stop token).
    return_logprobs: return (tokens, logprobs [B, N], entropy [B, N], lengths [B]) instead, N =
    max_new_tokens, float32, 0 after a row's end; lengths = new tokens up to and including the
    stop. stop_fn(new_tokens [B, t], finished [B]) -> bool [B]: rows that stop after this token.
    finish_check: read "have all rows finished?" on the host every this many steps (default: every
    step on CPU, where the read costs nothing, every 16 on an accelerator, where it is a device
    sync). Finished rows only ever receive the fill token, so the output is the same for any
    value; a larger one may run up to finish_check - 1 needless steps at the end.
    decode: how each step runs: "eager" (attention over the filled cache positions), "static",
    "compile" or "graph" (the fixed-shape step of megads.model.static: eager, torch.compile'd, or
    a CUDA graph replayed each step), or "auto": "graph" on CUDA where the model allows it
    (megads.model.static.graph_support), else "eager".
    share_prompts: rows with the same prompt (tokens and mask; a GRPO group's G samples) are
    prefilled once, and each row's cache is a copy of its prompt's (an RL rollout's prefill then
    costs its distinct prompts, not B rows).
    """
    if finish_check is None:
        finish_check = 1 if tokens.device.type == "cpu" else 16
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
    rows, index = _distinct_prompts(tokens, mask[:, :S]) if share_prompts else (None, None)
    cache = new_cache(model.cfg, B if rows is None else len(rows), S + max_new_tokens, dtype=dtype, device=device,
                      quant=cache_quant, naive=naive)
    out = torch.empty(B, S + max_new_tokens, dtype=tokens.dtype, device=device)
    out[:, :S] = tokens
    stop = torch.tensor(list(stop_tokens), dtype=tokens.dtype, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    fill = pad_token_id if pad_token_id is not None else (int(stop[0]) if len(stop) else 0)
    if rows is None:
        logits = model(tokens, positions=positions, cache=cache, attention_mask=mask[:, :S], naive=naive,
                       logits_to_keep=1)[:, -1]  # the prompt's last position alone needs the head
    else:
        logits = model(tokens[rows], positions=positions[rows], cache=cache, attention_mask=mask[rows, :S],
                       naive=naive, logits_to_keep=1)[:, -1].index_select(0, index)
        cache = cache.select_rows(index)
    step = _decode_step(model, cache, mask, decode, naive)
    next_pos = positions[:, -1] + 1
    n_done = 0
    if return_logprobs:
        logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        ents = torch.zeros_like(logps)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
        out[:, S + t] = nxt
        n_done = t + 1
        if return_logprobs:
            lsm = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
            live = ~finished
            logps[:, t] = torch.where(live, lsm.gather(-1, nxt.unsqueeze(-1)).squeeze(-1), 0.0)
            ents[:, t] = torch.where(live, -(lsm.exp() * lsm).sum(-1), 0.0)
            lengths += live.long()
        if len(stop) or stop_fn is not None:
            if len(stop):
                finished |= torch.isin(nxt, stop)
            if stop_fn is not None:
                finished |= stop_fn(out[:, S:S + t + 1], finished)
            if (t + 1) % finish_check == 0 and _all_finished(finished, sync):
                break
        if t == max_new_tokens - 1:
            break
        mask[:, S + t] = True
        if step is not None:
            logits = step(nxt, next_pos, S + t)
        else:
            logits = model(nxt.unsqueeze(1), positions=next_pos.unsqueeze(1), cache=cache,
                           attention_mask=mask[:, :S + t + 1], naive=naive)[:, -1]
        next_pos = next_pos + 1
    if n_done < max_new_tokens:
        out[:, S + n_done:] = fill
    model.train(was_training)
    if return_logprobs:
        return out, logps, ents, lengths
    return out


def _distinct_prompts(tokens: torch.Tensor, mask: torch.Tensor):
    """(rows, index): one row of each distinct (tokens, mask) row, and for every row the position
    of its prompt in `rows`; (None, None) when all rows differ."""
    B = tokens.shape[0]
    if B < 2:
        return None, None
    _, index = torch.unique(torch.cat([tokens, mask.to(tokens.dtype)], 1), dim=0, return_inverse=True)
    n = int(index.max()) + 1
    if n == B:
        return None, None
    rows = torch.full((n,), B, dtype=torch.long, device=tokens.device)
    rows.scatter_reduce_(0, index, torch.arange(B, device=tokens.device), "amin")
    return rows, index


def _decode_step(model, cache, mask, decode: str, naive: bool):
    """The fixed-shape step object for `decode` (None: the plain step)."""
    from megads.model import static

    if decode == "auto":
        decode = "eager" if naive or static.graph_support(model, cache, mask.device) else "graph"
    if decode == "eager":
        return None
    if decode not in static.MODES:
        raise ValueError(f"decode must be 'auto', 'eager' or one of {static.MODES}, got {decode!r}")
    return static.StaticDecode(model, cache, mask, decode)


def _all_finished(finished: torch.Tensor, sync: bool) -> bool:
    done = finished.all()
    if sync:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = done.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item())
    return bool(done)
