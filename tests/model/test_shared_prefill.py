"""generate prefills each distinct prompt once (share_prompts, the default): the G samples of a
GRPO group get copies of their prompt's cache rows. Checked against prefilling every row and
against a naive greedy loop without cache, for each cache kind and decode mode; the prefill sees
only the distinct rows."""
from __future__ import annotations

import pytest
import torch

from megads.model.cache import new_cache
from megads.model.generate import _distinct_prompts, generate
from test_mtp_generate import cfg_for, make, naive_greedy


def grouped(cfg, P=3, G=4, S=7, seed=5):
    """P prompts x G samples (prompt-major), left-padded: prompt p has S - p real tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, cfg.vocab_size, (P, S), generator=g)
    mask = torch.ones(P, S, dtype=torch.bool)
    for p in range(P):
        mask[p, :p] = False
    prompts = prompts.masked_fill(~mask, 0)
    return prompts.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)


def test_distinct_prompts_rows_and_index():
    tokens = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [1, 2, 3], [0, 5, 6]])
    mask = tokens != 0
    rows, index = _distinct_prompts(tokens, mask)
    assert len(rows) == 2
    assert torch.equal(tokens[rows][index], tokens) and torch.equal(mask[rows][index], mask)
    assert sorted(rows.tolist()) == [0, 1]  # the first row of each prompt
    # the same tokens under another mask (a real token 0 instead of padding) is another prompt
    mask2 = mask.clone()
    mask2[4, 0] = True
    rows, index = _distinct_prompts(tokens, mask2)
    assert len(rows) == 3 and torch.equal(tokens[rows][index], tokens) and torch.equal(mask2[rows][index], mask2)
    assert _distinct_prompts(tokens[:2], mask[:2]) == (None, None)  # all distinct
    assert _distinct_prompts(tokens[:1], mask[:1]) == (None, None)


SETTINGS = {
    "mla": (dict(), dict()),
    "mla_dense_no_q_lora": (dict(q_lora_rank=0, n_routed_experts=0), dict()),
    "int8_cache": (dict(), dict(cache_quant="int8")),
    "naive_cache": (dict(), dict(naive=True)),
    "static_step": (dict(), dict(decode="static")),
    "mha": (dict(attention="mha"), dict()),
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_equals_every_row_prefilled(name, temperature):
    model_kw, gen_kw = SETTINGS[name]
    cfg = cfg_for(**model_kw)
    model = make(cfg, seed=2).eval()
    tokens, mask = grouped(cfg)
    out = {}
    for share in (False, True):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(len(tokens))] if temperature else None
        out[share] = generate(model, tokens, max_new_tokens=9, temperature=temperature, attention_mask=mask,
                              pad_token_id=0, generator=gens, return_logprobs=True, stop_tokens=[3],
                              share_prompts=share, **gen_kw)
    (t0, lp0, e0, n0), (t1, lp1, e1, n1) = out[False], out[True]
    assert torch.equal(t1, t0) and torch.equal(n1, n0)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=2e-5)
    torch.testing.assert_close(e1, e0, rtol=0, atol=2e-5)
    if temperature:  # the samples of one prompt differ (their own generators): not G copies of one
        assert len({tuple(r) for r in t1[:4, 7:].tolist()}) > 1


def test_shared_greedy_equals_a_naive_loop_per_prompt():
    cfg = cfg_for()
    model = make(cfg, seed=3).eval()
    prompts = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    tokens = prompts.repeat_interleave(3, 0)
    with torch.no_grad():
        got = generate(model, tokens, max_new_tokens=8)
        for p in range(2):
            expected = naive_greedy(model, prompts[p:p + 1], 8)
            for r in range(3 * p, 3 * p + 3):
                assert torch.equal(got[r:r + 1], expected)


def test_the_prefill_sees_only_the_distinct_prompts():
    cfg = cfg_for()
    model = make(cfg, seed=2).eval()
    tokens, mask = grouped(cfg, P=3, G=4)
    seen = []
    hook = model.embed.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        generate(model, tokens, max_new_tokens=3, attention_mask=mask, pad_token_id=0)
        first = seen[0]
        seen.clear()
        generate(model, tokens, max_new_tokens=3, attention_mask=mask, pad_token_id=0, share_prompts=False)
    finally:
        hook.remove()
    assert first == (3, tokens.shape[1])  # 3 prompts, not 12 rows
    assert seen[0] == (12, tokens.shape[1])


@pytest.mark.parametrize("attention,quant", [("mla", None), ("mla", "int8"), ("mha", None)])
def test_cache_select_rows_copies_rows(attention, quant):
    cfg = cfg_for(attention=attention)
    cache = new_cache(cfg, 3, 10, quant=quant)
    model = make(cfg, seed=1).eval()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (3, 4)), positions=torch.arange(4).expand(3, 4), cache=cache)
    index = torch.tensor([2, 0, 2, 1, 1])
    sel = cache.select_rows(index)
    assert sel.length == cache.length == 4 and len(sel.layers) == len(cache.layers)
    for a, b in zip(cache.layers, sel.layers):
        ka, va = a.read(10)
        kb, vb = b.read(10)
        assert torch.equal(kb, ka[index]) and torch.equal(vb, va[index])
    # a copy: writing to the selected cache leaves the source alone
    before = cache.layers[0].read(10)[0].clone()
    sel.layers[0].write(0, torch.ones_like(sel.layers[0].read(10)[0][:, :2]), sel.layers[0].read(10)[1][:, :2])
    assert torch.equal(cache.layers[0].read(10)[0], before)
    assert not torch.equal(sel.layers[0].read(10)[0][:, :2], before[index][:, :2])
    if attention == "mla" and quant is None:  # kv and the rope key stay views of the one buffer
        assert sel.layers[0].kv.data_ptr() == sel.layers[0].latent.data_ptr()
