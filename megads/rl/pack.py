"""One forward of a prompt for all its completions: an RL batch's rows packed by shared prompt.

A GRPO micro-batch holds G completions of each prompt, every row [left-padded prompt |
completion]. The rows of one prompt agree on their first `prefix` positions (the prompt but its
last token: the log-prob of a completion's first token is read at the prompt's last position, so
that position starts each completion's segment). `pack_rows` lays each run of `group` such rows
out as one row,

    [prefix | row 1's positions prefix.. | row 2's positions prefix.. | ...],

which `Transformer.forward(..., shared_prefix=(prefix, group), token_losses=True)` runs with a
mask under which each segment sees the prefix and itself only, at the positions it had in its
own row: every completion token's log-prob is the one of the unpacked row (to float rounding),
and the prompt goes through the model once per group instead of G times. The balance statistics
count each sequence whole (the model weighs the prefix by `group`), so the expert loads and
balance losses equal the unpacked rows' too.

Attention runs as the prefix's causal part plus each segment against [prefix | itself]
(megads.model.mla.SharedPrefixMask): fewer query-key pairs than the rows one by one, as well as
fewer positions, for any prompt and completion lengths.
"""
from __future__ import annotations

import math

import torch


def shared_runs(tokens: torch.Tensor, mask: torch.Tensor, prefix: int) -> int:
    """The largest g such that rows [j*g, (j+1)*g) agree on their first `prefix` tokens and mask
    entries for every j (1 where no two neighbouring rows do)."""
    n = tokens.shape[0]
    if n < 2 or prefix < 1:
        return 1
    same = ((tokens[1:, :prefix] == tokens[:-1, :prefix]).all(1)
            & (mask[1:, :prefix] == mask[:-1, :prefix]).all(1)).tolist()
    runs, length = [], 1
    for s in same:
        if s:
            length += 1
        else:
            runs.append(length)
            length = 1
    runs.append(length)
    g = 0
    for r in runs:
        g = math.gcd(g, r)
    return g


def pack_rows(prefix: int, group: int, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Each [N, S] tensor -> [N / group, prefix + group * (S - prefix)]: the first `prefix` entries
    of each run's first row, then every row's entries from `prefix` on."""
    out = []
    for x in rows:
        N, S = x.shape
        runs = x.view(N // group, group, S)
        out.append(torch.cat([runs[:, 0, :prefix], runs[:, :, prefix:].reshape(N // group, group * (S - prefix))],
                             dim=1))
    return out


def unpack_segments(x: torch.Tensor, group: int) -> torch.Tensor:
    """[N / group, group * C] (the packed rows' segment entries) -> [N, C]."""
    M, L = x.shape
    return x.reshape(M * group, L // group)
