"""Rollouts from the policy itself, in its own layout: G completions per prompt sampled with the
absorbed-MLA cache (megads.model.generate), with the sampler's per-token log-probs kept.

Tensor- and expert-parallel ranks decode in lockstep (every rank runs the same number of
forwards: `sync`); data-parallel ranks take different prompts. There is no second engine and no
copy of the weights. Each completion draws from its own generator, seeded by (seed, step, prompt
index, sample index), so the completions are the same in every layout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megads.model.generate import generate


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, S + T] left-padded prompt, then the completion (pad after its end)
    prompt_mask: torch.Tensor  # [N, S] bool
    completion_mask: torch.Tensor  # [N, T] bool: tokens up to and including the stop
    logps: torch.Tensor  # [N, T] sampler log-probs (temperature-scaled distribution), 0 after the end
    entropy: torch.Tensor  # [N, T] the sampling distribution's entropy, 0 after the end
    truncated: torch.Tensor  # [N] bool: no EOS / stop string within max_new_tokens
    texts: list[str]  # completions as text, cut after the stop string
    seconds: float

    @property
    def prompt_len(self) -> int:
        return self.prompt_mask.shape[1]


class StopStrings:
    """stop_fn for generate: a row stops once its decoded completion contains a stop string. Only
    rows whose last token can end a stop string are decoded (a per-vocabulary table)."""

    def __init__(self, tok, stops: list[str], vocab_size: int):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.window = 4 + max((len(tok.encode(s)) for s in self.stops), default=0)
        ends = {s[-1] for s in self.stops}
        self.trigger = torch.zeros(vocab_size, dtype=torch.bool)
        for i in range(min(vocab_size, tok.vocab_size)):
            piece = tok.decode([i])
            if any(c in piece for c in ends) or "\ufffd" in piece:
                self.trigger[i] = True

    def __call__(self, new: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(finished)
        last = new[:, -1]
        cand = (~finished) & self.trigger.to(last.device)[last]
        for r in cand.nonzero().flatten().tolist():
            text = self.tok.decode(new[r, -self.window:].tolist())
            out[r] = any(s in text for s in self.stops)
        return out


class RolloutCopy:
    """The policy in another dtype for sampling (grpo.rollout_precision): a model of the same
    layout whose weights and buffers (router biases) are copied from the policy, cast, before each
    use. The trainer recomputes the "old" log-probs in its own precision, so the loss never mixes
    dtypes; the sampler's differ from them by the rounding of the rollout dtype
    (rollout/logp_max_diff)."""

    def __init__(self, policy, copy):
        self.policy, self.model = policy, copy.eval().requires_grad_(False)
        self.pairs = list(zip(self._tensors(copy), self._tensors(policy)))
        for dst, src in self.pairs:
            if dst.shape != src.shape:
                raise ValueError(f"rollout copy: shape {tuple(dst.shape)} != policy {tuple(src.shape)}")

    @staticmethod
    def _tensors(m) -> list:
        return [p for p in m.parameters()] + [b for b in m.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def synced(self):
        """The copy, with the policy's current weights."""
        for dst, src in self.pairs:
            dst.copy_(src)
        return self.model


def completion_text(tok, ids: list[int], stops: list[str], eos_id: int | None) -> str:
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    text = tok.decode(ids)
    cut = [text.index(s) + len(s) for s in stops if s in text]
    return text[:min(cut)] if cut else text


def row_generators(seed: int, step: int, keys: list[tuple[int, int]]) -> list[torch.Generator]:
    """One generator per completion, from (seed, step, prompt index, sample index)."""
    gens = []
    for p, g in keys:
        s = (seed * 1_000_003 + step * 7_919 + p * 104_729 + g * 15_485_863) % (2 ** 63 - 1)
        gens.append(torch.Generator().manual_seed(s))
    return gens


@torch.no_grad()
def sample_groups(model, tok, prompts: list[list[int]], G: int, *, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, stops: list[str] = (), generators=None, sync: bool = True,
                  device=None, stop_fn=None, pad_to: int = 0, decode: str = "auto") -> Rollout:
    """G completions of each prompt (prompt-major: rows p*G .. p*G+G-1 are prompt p's group).
    pad_to: left-pad the prompts to at least this width (the trainer passes the longest prompt
    over all ranks, so every layout builds the same rows). decode: generate's step mode
    (grpo.rollout_decode)."""
    device = device or next(model.parameters()).device
    pad = tok.pad_id if tok.pad_id is not None else 0
    rows = [ids for ids in prompts for _ in range(G)]
    S = max(pad_to, max(len(r) for r in rows))
    tokens = torch.full((len(rows), S), pad, dtype=torch.long, device=device)
    pmask = torch.zeros(len(rows), S, dtype=torch.bool, device=device)
    for i, ids in enumerate(rows):
        tokens[i, S - len(ids):] = torch.tensor(ids, dtype=torch.long)
        pmask[i, S - len(ids):] = True
    stop_ids = [tok.eos_id] if tok.eos_id is not None else []
    if stop_fn is None and stops:
        stop_fn = StopStrings(tok, list(stops), model.cfg.vocab_size)
    t0 = time.perf_counter()
    out, logps, ent, lengths = generate(model, tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, stop_tokens=stop_ids, attention_mask=pmask, pad_token_id=pad,
                                        generator=generators, return_logprobs=True, stop_fn=stop_fn, sync=sync,
                                        decode=decode)
    seconds = time.perf_counter() - t0
    T = max_new_tokens
    cmask = torch.arange(T, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    texts, truncated = [], []
    for i in range(len(rows)):
        ids = out[i, S:S + int(lengths[i])].tolist()
        text = completion_text(tok, ids, list(stops), tok.eos_id)
        texts.append(text)
        ended = (tok.eos_id is not None and tok.eos_id in ids) or any(s in text for s in stops)
        truncated.append(not ended)
    return Rollout(out, pmask, cmask, logps, ent, torch.tensor(truncated, device=device), texts, seconds)
