"""SFT: the chat template and its loss mask, the JSONL token cache and its errors, packing with
per-document attention (packed == unpacked, documents isolated, positions restarting), the loss
against a reference written here, activation checkpointing with masks, and `megads train` with
`train.stage: sft`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import megads, train_args

from megads.config import ModelConfig
from megads.data.indexed import IndexedDataset
from megads.data.sft import PackedSFTDataset, render_chat, render_record, tokenize_sft
from megads.data.tokenizer import load_tokenizer
from megads.errors import DataError
from megads.model import Transformer


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus / "tok")


def test_chat_template_marks_assistant_spans_only(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha beta"},
            {"role": "assistant", "content": "<think>gamma</think><answer>delta</answer>"}]
    ids, mask = render_chat(tok, msgs)
    assert len(ids) == len(mask)
    sp = tok.special_ids
    assert ids[0] == sp["<|bos|>"] and ids[1] == sp["<|system|>"]
    a = ids.index(sp["<|assistant|>"])
    assert mask[:a + 1] == [0] * (a + 1)  # everything up to and including the role token: no loss
    assert all(mask[a + 1:]) and ids[-1] == sp["<|eos|>"]  # the answer and its closing eos
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        assert sp[t] in ids[a + 1:]  # one special token each, not spelled out in bytes
    gen, gmask = render_chat(tok, msgs[:2], add_generation_prompt=True)
    assert gen[-1] == sp["<|assistant|>"] and not any(gmask)


def test_prompt_completion_strings_and_messages(tok):
    ids, mask = render_record(tok, {"prompt": "def f():", "completion": " return 1"})
    n_prompt = 1 + len(tok.encode("def f():"))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    ids2, mask2 = render_record(tok, {"prompt": [{"role": "user", "content": "x"}],
                                      "completion": [{"role": "assistant", "content": "y"}]})
    ids3, mask3 = render_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert (ids2, mask2) == (ids3, mask3)
    for bad in ({"prompt": "a"}, {"messages": []}, {"messages": [{"role": "bot", "content": "x"}]},
                {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}):
        with pytest.raises(ValueError):
            render_record(tok, bad)


def _jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def _chats(n, seed=0):
    rng = np.random.RandomState(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.randint(2, 12)))
        a = " ".join(rng.choice(words, rng.randint(1, 20)))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def test_token_cache_is_reused_and_bad_lines_named(tok, tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", _chats(5), ['{"messages": 3}\n', "not json\n"])
    t, m = tokenize_sft(str(f), tok, str(tmp_path / "cache"))
    assert len(IndexedDataset(t)) == len(IndexedDataset(m)) == 5  # the 2 bad lines skipped
    stamp = Path(t + ".bin").stat().st_mtime_ns
    assert tokenize_sft(str(f), tok, str(tmp_path / "cache")) == (t, m)
    assert Path(t + ".bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(DataError, match=r"a\.jsonl:6: "):
        tokenize_sft(str(f), tok, str(tmp_path / "cache2"), on_error="fail")


def _packed(tok, tmp_path, n=12, seq=64, pack=True, loss_on="assistant"):
    f = _jsonl(tmp_path / "p.jsonl", _chats(n))
    t, m = tokenize_sft(str(f), tok, str(tmp_path / "cache"))
    return PackedSFTDataset([(IndexedDataset(t), IndexedDataset(m))], seq, seed=3, pack=pack, loss_on=loss_on,
                            pad_id=tok.pad_id), IndexedDataset(t), IndexedDataset(m)


def test_packing_layout(tok, tmp_path):
    ds, toks, masks = _packed(tok, tmp_path)
    unpacked, _, _ = _packed(tok, tmp_path, pack=False)
    assert len(unpacked) == 12 and len(ds) < len(unpacked)
    seen = []
    for i in range(len(ds)):
        r = ds[i]
        doc = r["doc_ids"]
        n_real = int((doc >= 0).sum())
        assert (doc[:n_real] >= 0).all() and (doc[n_real:] == -1).all()  # padding only at the tail
        assert (r["labels"][n_real:] == -100).all()
        for j in np.unique(doc[doc >= 0]):
            span = np.flatnonzero(doc == j)
            assert (np.diff(span) == 1).all() and (r["positions"][span] == np.arange(len(span))).all()
            seen.append(len(span))
    assert sorted(seen) == sorted(len(toks[k]) - 1 for k in range(len(toks)))  # every sample, whole


def _tiny(mtp=1):
    return ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_layers=2,
                       num_heads=2, kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                       first_k_dense=1, mtp_depth=mtp, seq_aux_alpha=0.0, max_seq_len=64)


def _batch(rows):
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("tokens", "labels", "doc_ids", "positions")}


def _loss_and_grads(model, b, num_items):
    model.zero_grad()
    out = model(b["tokens"], b["labels"], positions=b["positions"], doc_ids=b["doc_ids"], num_items=num_items)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_unpacked_loss_and_gradients(tok, tmp_path):
    from megads.model.transformer import loss_token_counts

    packed, _, _ = _packed(tok, tmp_path, n=6, seq=64)
    unpacked, _, _ = _packed(tok, tmp_path, n=6, seq=64, pack=False)
    torch.manual_seed(0)
    model = Transformer(_tiny()).double()
    bp, bu = _batch([packed[i] for i in range(len(packed))]), _batch([unpacked[i] for i in range(len(unpacked))])
    np_, nu = loss_token_counts(bp["labels"], 1, bp["doc_ids"]), loss_token_counts(bu["labels"], 1, bu["doc_ids"])
    assert torch.equal(np_, nu)  # the same loss tokens, LM and MTP
    op, gp = _loss_and_grads(model, bp, np_)
    cp = model.expert_counts()
    ou, gu = _loss_and_grads(model, bu, nu)
    cu = model.expert_counts()
    assert torch.equal(cp, cu) and int(cp[0].sum()) == 2 * int((bp["doc_ids"] >= 0).sum())  # padding not counted
    # (the cross-entropy runs in float32 whatever the model's dtype: float32 rounding, not 1e-12)
    assert float(op.lm_loss) == pytest.approx(float(ou.lm_loss), rel=1e-6)
    assert float(op.mtp_loss) == pytest.approx(float(ou.mtp_loss), rel=1e-6)
    for n in gu:
        scale = gu[n].abs().max().item()
        assert torch.allclose(gp[n], gu[n], rtol=1e-5, atol=1e-6 * scale), n


def test_sft_loss_against_a_reference_and_document_isolation(tok, tmp_path):
    packed, _, _ = _packed(tok, tmp_path, n=8, seq=64)
    row = next(packed[i] for i in range(len(packed)) if packed[i]["doc_ids"].max() >= 1)
    torch.manual_seed(1)
    model = Transformer(_tiny(mtp=0)).double().eval()
    b = _batch([row])
    with torch.no_grad():
        out = model(b["tokens"], b["labels"], positions=b["positions"], doc_ids=b["doc_ids"])
        # reference: every document alone, full logits, CE at its loss positions only
        total, n = 0.0, 0
        for j in range(int(row["doc_ids"].max()) + 1):
            span = np.flatnonzero(row["doc_ids"] == j)
            logits = model(b["tokens"][:, span])[0]
            lab = b["labels"][0, span]
            keep = lab != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], lab[keep], reduction="sum"))
            n += int(keep.sum())
        assert float(out.lm_loss) == pytest.approx(total / n, rel=1e-6)  # (float32 cross-entropy)
        # another document's tokens (prompt included) change nothing of this one's logits
        logits = model(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"])
        other = b["tokens"].clone()
        first = row["doc_ids"] == 0
        other[0, torch.from_numpy(first)] = (other[0, torch.from_numpy(first)] + 7) % 320
        logits2 = model(other, positions=b["positions"], doc_ids=b["doc_ids"])
        rest = torch.from_numpy(row["doc_ids"] >= 1)
        assert torch.equal(logits[0, rest], logits2[0, rest])
        assert not torch.equal(logits[0, torch.from_numpy(first)], logits2[0, torch.from_numpy(first)])


def test_loss_on_all_counts_the_prompt(tok, tmp_path):
    a, _, _ = _packed(tok, tmp_path, n=4, seq=64, loss_on="assistant")
    b, _, _ = _packed(tok, tmp_path, n=4, seq=64, loss_on="all")
    na = sum(int((a[i]["labels"] != -100).sum()) for i in range(len(a)))
    nb = sum(int((b[i]["labels"] != -100).sum()) for i in range(len(b)))
    assert nb > na


def test_activation_checkpointing_keeps_document_masks(tok, tmp_path):
    packed, _, _ = _packed(tok, tmp_path, n=6, seq=64)
    b = _batch([packed[i] for i in range(len(packed))])
    torch.manual_seed(2)
    model = Transformer(_tiny()).double().train()
    o1, g1 = _loss_and_grads(model, b, None)
    model.activation_checkpointing = True
    o2, g2 = _loss_and_grads(model, b, None)
    assert float(o1.loss.detach()) == pytest.approx(float(o2.loss.detach()), rel=1e-12)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-14), n


def test_megads_train_stage_sft(corpus, tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", _chats(80, seed=5))
    extra = ["train.stage=sft", f"data.paths={data}", f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=64",
             "data.split=90,10", "train.lr=0.01"]
    r = megads(*train_args(corpus, tmp_path / "run", steps=8, extra=extra))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in recs] == list(range(1, 9))
    assert all(x["num_loss_tokens"] > 0 and 0 < x["packing_efficiency"] <= 1 for x in recs)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5  # it learns the answers
    r = megads("generate", "--checkpoint", str(tmp_path / "run" / "final"), "--chat", "--prompt", "alpha beta",
               "--max-new-tokens", "4")
    assert r.returncode == 0 and "--- prompt 0: 'alpha beta'" in r.stdout, r.stderr[-2000:]
    bad = _jsonl(tmp_path / "bad.jsonl", _chats(3), ['{"prompt": 1, "completion": 2}\n'])
    r = megads(*train_args(corpus, tmp_path / "run2", extra=[*extra[:1], f"data.paths={bad}", "data.on_error=fail",
                                                              f"data.cache_dir={tmp_path / 'cache'}"]))
    assert r.returncode == 2 and f"{bad}:4: " in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
