"""Multi-token prediction loss by hand; KV-cached generation against a naive greedy loop; stop
tokens; nucleus sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megads.config import ModelConfig
from megads.model.generate import sample_next
from megads.model.transformer import Transformer


def cfg_for(**kw) -> ModelConfig:
    base = dict(vocab_size=57, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_layers=2,
                first_k_dense=1, num_heads=2, q_lora_rank=10, kv_lora_rank=12, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, max_seq_len=64, init_std=0.15)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg)


# ----------------------------------------------------------------------------- MTP

@pytest.mark.parametrize("alpha, masked_prompt", [(0.0, False), (0.01, False), (0.0, True)])
def test_mtp_loss_by_hand(alpha, masked_prompt):
    lam = 0.3
    cfg = cfg_for(mtp_depth=1, mtp_lambda=lam, seq_aux_alpha=alpha)
    model = make(cfg).train()
    B, S = 2, 9
    seq = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
    tokens, labels = seq[:, :S], seq[:, 1:]
    labels = labels.clone()
    labels[1, -1] = -100  # an ignored label: no LM target there, and the MTP module skips it too
    if masked_prompt:  # SFT: no loss on the prompt; the MTP input is still the true next token
        labels[0, :4] = -100
    out = model(tokens, labels=labels)

    # main model, block by block
    h = model.embed(tokens)
    cos, sin = model.rope(torch.arange(S), h.dtype)
    aux = torch.zeros(())
    for blk in model.layers:
        h, a = blk(h, cos, sin)
        aux = aux + a
    logits = model.head(model.norm(h))
    lm = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(tokens), logits)

    # depth 1: position i combines h_i with Emb(t_{i+1}) and predicts t_{i+2}
    mtp = model.mtp[0]
    L = S - 1
    emb_next = model.embed(seq[:, 1:S])  # Emb(t_{i+1}), i < S-1
    x = torch.cat([mtp.hnorm(h[:, :L]), mtp.enorm(emb_next)], dim=-1) @ mtp.eh_proj.weight.T
    cos1, sin1 = model.rope(torch.arange(L), h.dtype)
    h1, a1 = mtp.block(x, cos1, sin1)
    aux = aux + a1
    mtp_logits = model.head(mtp.norm(h1))
    target = labels[:, 1:]  # two ahead of the token position (the same ignored labels)
    assert torch.equal(target[1, :-1], seq[1, 2:S])
    mtp_loss = F.cross_entropy(mtp_logits.reshape(-1, cfg.vocab_size), target.reshape(-1), ignore_index=-100)

    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.mtp_loss, mtp_loss)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, lm + lam * mtp_loss + aux)
    assert out.num_tokens.item() == (labels != -100).sum()
    assert (aux.item() > 0) == (alpha > 0)
    # the MTP module gets gradients, the embedding and head are shared
    out.loss.backward()
    assert mtp.eh_proj.weight.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0


def test_no_mtp_loss_without_mtp_modules():
    cfg = cfg_for(mtp_depth=0)
    model = make(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    out = model(tokens, labels=tokens.roll(-1, 1))
    assert out.mtp_loss.item() == 0.0 and len(model.mtp) == 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


# ----------------------------------------------------------------------------- generation

def naive_greedy(model, tokens, n):
    seq = tokens
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=0, n_routed_experts=0),
                                dict(rope_scaling="yarn", rope_factor=4.0, original_max_seq_len=4, mscale_all_dim=1.0)])
def test_greedy_generate_equals_a_naive_loop(kw):
    cfg = cfg_for(**kw)
    model = make(cfg, seed=3).eval()
    B, S, N = 3, 5, 8
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = naive_greedy(model, tokens, N)
        got = model.generate(tokens, max_new_tokens=N, temperature=0.0)
        got_naive_cache = model.generate(tokens, max_new_tokens=N, naive=True)
    assert got.shape == (B, S + N) and got.dtype == tokens.dtype
    assert torch.equal(got, expected)
    assert torch.equal(got_naive_cache, expected)


def test_logits_to_keep_gives_the_last_positions_logits():
    """logits_to_keep=k runs the head on the last k positions: the same values as every position's
    logits sliced, without a cache, as a generation's prefill (whose decode step after it is
    unchanged), and on the sequence-parallel branch (one rank: the gathers are identities)."""
    from megads.model.cache import MLACache

    cfg = cfg_for()
    model = make(cfg, seed=2).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        for k in (1, 3):
            got = model(tokens, logits_to_keep=k)
            assert got.shape == (2, k, cfg.vocab_size)
            torch.testing.assert_close(got, full[:, -k:], rtol=0, atol=1e-6)
        cache, ref_cache = MLACache(cfg, 2, 8), MLACache(cfg, 2, 8)
        torch.testing.assert_close(model(tokens, cache=cache, logits_to_keep=1), full[:, -1:], rtol=0, atol=1e-6)
        model(tokens, cache=ref_cache)
        nxt = full[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(model(nxt, cache=cache), model(nxt, cache=ref_cache))
        model.sequence_parallel = True
        try:
            torch.testing.assert_close(model(tokens, logits_to_keep=2), full[:, -2:], rtol=0, atol=1e-6)
        finally:
            model.sequence_parallel = False


def test_generate_restores_training_mode_and_needs_no_grad():
    cfg = cfg_for()
    model = make(cfg).train()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    assert out.shape == (1, 5) and model.training and not out.requires_grad


def test_stop_tokens_end_rows():
    cfg = cfg_for()
    model = make(cfg, seed=5).eval()
    B, S, N = 3, 4, 9
    tokens = torch.randint(1, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        free = model.generate(tokens, max_new_tokens=N)
    new = free[:, S:]
    # stop on the token row 0 emits at step 2 (unless it appeared earlier)
    stop = int(new[0, 2])
    pad = 0
    assert pad not in tokens.tolist()
    with torch.no_grad():
        got = model.generate(tokens, max_new_tokens=N, stop_tokens=[stop], pad_token_id=pad)
        got_nopad = model.generate(tokens, max_new_tokens=N, stop_tokens=[stop])
    assert got.shape == (B, S + N)
    assert torch.equal(got[:, :S], tokens)
    hit_any = False
    for b in range(B):
        row = new[b].tolist()
        if stop in row:
            j = row.index(stop)
            hit_any = True
            assert got[b, S:S + j + 1].tolist() == row[:j + 1]  # up to and including the stop token
            assert (got[b, S + j + 1:] == pad).all()  # padded afterwards
            assert (got_nopad[b, S + j + 1:] == stop).all()  # no pad id: filled with the stop token
        else:
            assert got[b, S:].tolist() == row
    assert hit_any
    # every row stops at once: generation ends early, the rest is padding
    first = [int(t) for t in new[:, 0]]
    with torch.no_grad():
        early = model.generate(tokens, max_new_tokens=N, stop_tokens=first, pad_token_id=pad)
    assert early.shape == (B, S + N)
    assert torch.equal(early[:, S], new[:, 0]) and (early[:, S + 1:] == pad).all()


def test_finish_checked_every_k_steps_gives_the_same_output(monkeypatch):
    """generate(finish_check=k) reads 'all finished?' on the host every k steps only (the
    accelerator default is 16): tokens, log-probs, entropies and lengths equal every-step checks."""
    from megads.model import generate as gen_mod

    cfg = cfg_for()
    model = make(cfg, seed=5).eval()
    B, S, N = 4, 4, 11
    tokens = torch.randint(1, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(6))
    free = model.generate(tokens, max_new_tokens=N)[:, S:]
    stops = [int(t) for t in free[:, 2]]  # every row stops by its third token (greedy)
    calls = []
    real = gen_mod._all_finished
    monkeypatch.setattr(gen_mod, "_all_finished", lambda f, s: calls.append(1) or real(f, s))
    outs = {}
    for k in (1, 4):
        calls.clear()
        for temperature in (0.0, 1.0):
            gens = [torch.Generator().manual_seed(10 + b) for b in range(B)]
            outs[k, temperature] = gen_mod.generate(model, tokens, max_new_tokens=N, temperature=temperature,
                                                    stop_tokens=stops, pad_token_id=0, generator=gens,
                                                    return_logprobs=True, finish_check=k)
        outs[k, "reads"] = len(calls)
    for temperature in (0.0, 1.0):
        for a, b in zip(outs[1, temperature], outs[4, temperature]):
            assert torch.equal(a, b)
    assert outs[1, 0.0][3].max() <= 3  # greedy: every row ended within 3 tokens
    assert outs[4, "reads"] < outs[1, "reads"]


# ----------------------------------------------------------------------------- sampling

def test_top_p_only_samples_inside_the_nucleus():
    probs = torch.tensor([0.04, 0.25, 0.06, 0.5, 0.15])  # sorted: 0.5 (3), 0.25 (1), 0.15 (4) | 0.06, 0.04
    logits = probs.log().unsqueeze(0).expand(4000, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    # top_p 0.8: the nucleus is the smallest set with mass >= 0.8: {3, 1, 4} (0.9)
    picks = sample_next(logits, temperature=1.0, top_p=0.8, generator=gen)
    assert set(picks.tolist()) == {1, 3, 4}
    freq = torch.bincount(picks, minlength=5).float() / picks.numel()
    torch.testing.assert_close(freq[[3, 1, 4]], torch.tensor([0.5, 0.25, 0.15]) / 0.9, atol=0.03, rtol=0)
    # top_p 0.6: {3, 1}; top_p 0.3: only the most likely token
    assert set(sample_next(logits, 1.0, 0.6, generator=gen).tolist()) == {1, 3}
    assert set(sample_next(logits, 1.0, 0.3, generator=gen).tolist()) == {3}
    # top_p 1.0 can pick anything; the same seed gives the same draws
    assert set(sample_next(logits, 1.0, 1.0, generator=gen).tolist()) == {0, 1, 2, 3, 4}
    a = sample_next(logits[:50], 1.0, 0.8, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits[:50], 1.0, 0.8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # temperature 0 is argmax
    assert (sample_next(logits[:3], 0.0, 0.5) == 3).all()
    # a low temperature sharpens the distribution (mass 0.5 -> ~0.92 for token 3 at T=0.25)
    cold = sample_next(logits, 0.25, 1.0, generator=gen)
    assert (cold == 3).float().mean() > 0.85


def test_sampled_generation_is_seeded():
    cfg = cfg_for()
    model = make(cfg, seed=8).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 3))
    with torch.no_grad():
        a = model.generate(tokens, max_new_tokens=6, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(1))
        b = model.generate(tokens, max_new_tokens=6, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 9)


def test_left_padded_row_gives_the_same_losses_as_alone():
    """attention_mask reaches the MTP block too, and a padding position sets no MTP target."""
    cfg = cfg_for(mtp_depth=1)
    model = make(cfg, seed=9).eval()
    seq = torch.randint(1, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    tokens, labels = seq[:, :7], seq[:, 1:]
    n_pad = 3
    padded = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), tokens], 1)
    padded_labels = torch.cat([torch.full((1, n_pad), -100), labels], 1)
    mask = padded != 0
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(tokens, labels=labels)
        both = model(padded, labels=padded_labels, positions=positions, attention_mask=mask)
    torch.testing.assert_close(both.lm_loss, alone.lm_loss)
    torch.testing.assert_close(both.mtp_loss, alone.mtp_loss)
    assert both.num_tokens == alone.num_tokens
