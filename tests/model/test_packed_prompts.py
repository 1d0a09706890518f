"""The log-prob forward with each prompt computed once for its completions (megads.rl.pack,
Transformer.forward(shared_prefix=...)): rows [left-padded prompt | completion] of one prompt
packed as [prompt | completion 1 | completion 2 | ...] give every completion token the log-prob of
its own row, the same balance losses and expert loads, and the same gradients. Checked against
the rows run one by one, in float64, and the mask against a brute-force rule."""
from __future__ import annotations

import pytest
import torch

from megads.model.mla import SharedPrefixMask
from megads.rl.pack import pack_rows, shared_runs, unpack_segments
from test_mtp_generate import cfg_for, make


def rl_batch(cfg, P=3, G=4, Sp=7, C=6, seed=3):
    """An RL micro-batch as GRPO builds it: P prompts x G completions, prompts left-padded to Sp,
    completions right-padded to C (some end early). Returns the model inputs and loss_from."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, cfg.vocab_size, (P, Sp), generator=g)
    pmask = torch.ones(P, Sp, dtype=torch.bool)
    for p in range(P):
        pmask[p, :p] = False  # prompt p has Sp - p real tokens
    prompts = prompts.masked_fill(~pmask, 0).repeat_interleave(G, 0)
    pmask = pmask.repeat_interleave(G, 0)
    comp = torch.randint(1, cfg.vocab_size, (P * G, C), generator=g)
    lengths = torch.randint(1, C + 1, (P * G,), generator=g)
    cmask = torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)
    x = torch.cat([prompts, comp.masked_fill(~cmask, 0)], dim=1)
    attn = torch.cat([pmask, cmask], dim=1)
    positions = (attn.long().cumsum(-1) - 1).clamp_min(0)
    labels = x[:, 1:].clone()
    ok = torch.zeros_like(labels, dtype=torch.bool)
    ok[:, Sp - 1:] = cmask
    labels[~ok] = -100
    batch = {"tokens": x[:, :-1], "labels": labels, "positions": positions[:, :-1], "attention_mask": attn[:, :-1]}
    return batch, Sp - 1, cmask


def run(model, batch, prefix, group):
    if group == 1:
        out = model(batch["tokens"], batch["labels"], positions=batch["positions"],
                    attention_mask=batch["attention_mask"], token_losses=True, loss_from=prefix)
        return out.token_losses, out.loss
    tokens, labels, positions, mask = pack_rows(prefix, group, batch["tokens"], batch["labels"], batch["positions"],
                                                batch["attention_mask"])
    out = model(tokens, labels, positions=positions, attention_mask=mask, token_losses=True, loss_from=prefix,
                shared_prefix=(prefix, group))
    return unpack_segments(out.token_losses, group), out.loss


@pytest.mark.parametrize("prefix, group, seg", [(5, 3, 4), (1, 2, 1), (0, 3, 2), (6, 1, 3)])
def test_shared_prefix_attention_by_rule(prefix, group, seg):
    """SharedPrefixMask.attend (the prefix's causal attention, then each segment against [prefix |
    itself]) against one dense masked softmax in float64 whose mask is built position by position."""
    B, h, d, S = 2, 3, 5, prefix + group * seg
    g = torch.Generator().manual_seed(prefix * 7 + group)
    q, k, v = (torch.randn(B, h, S, d, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, :min(2, prefix)] = False  # left padding (its query rows see no key: zeros)
    keep[1, -1] = False  # the last segment's end is padding
    mask = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                si = -1 if i < prefix else (i - prefix) // seg
                sj = -1 if j < prefix else (j - prefix) // seg
                mask[b, 0, i, j] = bool(keep[b, j]) and j <= i and (sj == -1 or sj == si)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    want = torch.nan_to_num(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)) @ v
    got = SharedPrefixMask(keep, prefix, group).attend(q, k, v, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if prefix:  # a query row with no kept key gives zeros
        assert not mask[0, 0, 0].any() and got[0, :, 0].abs().max() == 0


def test_pack_rows_and_runs():
    x = torch.arange(24).view(4, 6)
    x[1, :2] = x[0, :2]
    x[3, :2] = x[2, :2]
    mask = torch.ones_like(x, dtype=torch.bool)
    assert shared_runs(x, mask, 2) == 2
    assert shared_runs(x, mask, 3) == 1  # the rows differ at position 2
    mask2 = mask.clone()
    mask2[1, 0] = False
    assert shared_runs(x, mask2, 2) == 1  # same tokens, another mask: another prompt
    (p,) = pack_rows(2, 2, x)
    assert p.tolist() == [[0, 1, 2, 3, 4, 5, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 20, 21, 22, 23]]
    assert torch.equal(unpack_segments(p[:, 2:], 2), x[:, 2:])
    runs = torch.tensor([[1, 1], [1, 1], [1, 1], [2, 2], [2, 2], [2, 2]])
    assert shared_runs(runs, torch.ones_like(runs), 2) == 3
    assert shared_runs(torch.cat([runs, runs[:2]]), torch.ones(8, 2), 2) == 1  # runs of 3, 3, 2: no common g > 1


@pytest.mark.parametrize("kw", [
    dict(seq_aux_alpha=0.01),
    dict(seq_aux_alpha=0.01, aux_loss_alpha=0.02, router_bias=True),
    dict(q_lora_rank=0, score_func="softmax", seq_aux_alpha=0.01),
    dict(attention="mha", seq_aux_alpha=0.01),
])
@pytest.mark.parametrize("group", [4, 2])
def test_packed_equals_rows(kw, group):
    cfg = cfg_for(**kw)
    model = make(cfg).double().train()
    batch, prefix, cmask = rl_batch(cfg)
    assert shared_runs(batch["tokens"][:, :prefix], batch["attention_mask"][:, :prefix], prefix) == 4

    def losses_and_grads(g):
        model.zero_grad()
        tl, aux = run(model, batch, prefix, g)
        counts = model.expert_counts()
        # a GRPO-like loss: advantages on each completion's kept tokens, plus the balance terms
        adv = torch.linspace(-1, 1, tl.shape[0], dtype=tl.dtype).unsqueeze(1)
        ((tl * adv * cmask).sum() + aux).backward()
        return tl.detach(), aux.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}

    tl0, aux0, c0, g0 = losses_and_grads(1)
    tl1, aux1, c1, g1 = losses_and_grads(group)
    assert tl0.shape == tl1.shape == cmask.shape
    torch.testing.assert_close(tl1 * cmask, tl0 * cmask, rtol=1e-10, atol=1e-10)
    assert aux0 > 0
    torch.testing.assert_close(aux1, aux0, rtol=1e-10, atol=1e-12)
    assert torch.equal(c1, c0)  # the expert loads of the bias update: each sequence counted whole
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-8, atol=1e-11, msg=n)


def test_packed_float32_close_to_rows():
    cfg = cfg_for(seq_aux_alpha=0.01)
    model = make(cfg).train()
    batch, prefix, cmask = rl_batch(cfg, P=2, G=8, Sp=12, C=5)
    with torch.no_grad():
        tl0, _ = run(model, batch, prefix, 1)
        tl1, _ = run(model, batch, prefix, 8)
    torch.testing.assert_close(tl1 * cmask, tl0 * cmask, rtol=1e-5, atol=1e-5)


def test_shared_prefix_refusals():
    cfg = cfg_for()
    model = make(cfg)
    batch, prefix, _ = rl_batch(cfg)
    tokens, labels, positions, mask = pack_rows(prefix, 4, batch["tokens"], batch["labels"], batch["positions"],
                                                batch["attention_mask"])
    with pytest.raises(ValueError, match="shared_prefix"):  # the LM loss (with MTP) is not a packed-row loss
        model(tokens, labels, positions=positions, attention_mask=mask, shared_prefix=(prefix, 4))
    with pytest.raises(ValueError, match="shared_prefix"):  # segments of unequal length
        model(tokens, labels, positions=positions, attention_mask=mask, token_losses=True, shared_prefix=(prefix, 5))
    with pytest.raises(ValueError, match="shared_prefix"):  # needs the kept keys
        model(tokens, labels, positions=positions, token_losses=True, shared_prefix=(prefix, 4))
