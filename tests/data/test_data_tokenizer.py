"""Byte-level BPE: exact round trips, stable special tokens, loading and errors."""
from __future__ import annotations

import json

import pytest

from megads.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from megads.errors import DataError

ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\t\ttabs\n\n\nnewlines\r\nCRLF\n",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇯🇵 and skin tones 👍🏽",
    "CJK 日本語のテキスト 中文文本 한국어 텍스트",
    "accents: café naïve über Ångström; Cyrillic: привет мир; Greek: αβγ; Arabic: مرحبا",
    "math ∑∫√∞ ≠ ≤ and symbols © ® ™ € £ ¥",
    "zero\u200bwidth and combining e\u0301 and nbsp\u00a0here",
    "   \n\t  \n ",
    "<|bos|>special<|eos|> text <think>reasoning</think><answer>42</answer>",
    "def f(x):\n    return x ** 2  # comment\n",
    "\x00\x01 control chars \x7f",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_round_trip_batch(tokenizer):
    batch = tokenizer.encode_batch(ROUND_TRIP)
    assert batch == [tokenizer.encode(t) for t in ROUND_TRIP]
    assert [tokenizer.decode(b) for b in batch] == ROUND_TRIP


def test_special_tokens_have_stable_ids(tokenizer, other_tokenizer):
    for tok in (tokenizer, other_tokenizer):
        for i, t in enumerate(SPECIAL_TOKENS):
            assert tok.token_id(t) == i
            assert tok.encode(t) == [i]  # a single token, not split into bytes
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tokenizer.special_ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}


def test_skip_special_tokens(tokenizer):
    ids = [tokenizer.bos_id] + tokenizer.encode("hi there") + [tokenizer.eos_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi there"
    assert tokenizer.decode(ids) == "<|bos|>hi there<|eos|>"


def test_vocab_and_files(tokenizer):
    assert 300 < tokenizer.vocab_size <= 400
    with open(f"{tokenizer.path}/tokenizer_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["eos_token"] == "<|eos|>" and cfg["special_token_ids"]["<|eos|>"] == 1
    again = load_tokenizer(f"{tokenizer.path}/tokenizer.json")  # the file works as well as the dir
    assert again.hash == tokenizer.hash and again.vocab_size == tokenizer.vocab_size
    with pytest.raises(DataError, match="no token"):
        tokenizer.token_id("<|nope|>")


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_train_errors(tmp_path, corpus_dir):
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer([str(corpus_dir / "a.jsonl")], 100, tmp_path / "t")
    with pytest.raises(DataError, match="not found"):
        train_tokenizer([str(tmp_path / "missing.jsonl")], 300, tmp_path / "t")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer([str(empty)], 300, tmp_path / "t")
    assert not (tmp_path / "t" / "tokenizer.json").exists()


def test_training_is_deterministic(tmp_path, corpus_dir, tokenizer):
    again = train_tokenizer([str(corpus_dir / "a.jsonl"), str(corpus_dir / "b.jsonl")], 400, tmp_path / "t")
    assert again.hash == tokenizer.hash
