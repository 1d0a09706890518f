"""Builtin stdlib corpus, prepare_builtin, build_datasets and the CLI commands."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from data_helpers import make_docs, write_jsonl
from megads.config import DataConfig
from megads.data import build_datasets, parse_paths, prepare_builtin
from megads.data.corpus import build_builtin_corpus
from megads.data.dataset import BlendedDataset, GPTDataset
from megads.data.preprocess import preprocess
from megads.errors import DataError

TINY = 300_000  # bytes of stdlib text: enough for a 400-token tokenizer, fast to build


def test_corpus_deterministic_and_bounded(tmp_path):
    a = build_builtin_corpus(tmp_path / "a", max_bytes=TINY)
    b = build_builtin_corpus(tmp_path / "b", max_bytes=TINY)
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    docs = [json.loads(line) for p in a for line in open(p, encoding="utf-8")]
    assert docs and all(set(d) == {"text", "source"} for d in docs)
    assert sum(len(d["text"].encode()) for d in docs) <= TINY
    sources = [d["source"] for d in docs]
    assert sources == sorted(sources)
    assert not any(part in ("test", "tests", "site-packages") for s in sources for part in s.split("/"))
    # idempotent: a second call reuses the shards
    mtimes = [os.stat(p).st_mtime_ns for p in a]
    assert build_builtin_corpus(tmp_path / "a", max_bytes=TINY) == a
    assert [os.stat(p).st_mtime_ns for p in a] == mtimes


def test_prepare_builtin_and_build_datasets(tmp_path):
    cfg = DataConfig(builtin_corpus=True, data_dir=str(tmp_path / "builtin"), vocab_size=400, split="90,10")
    with pytest.raises(DataError, match="prepare-data"):
        build_datasets(cfg, 32, 0, 10, 10)
    prefix, tok_dir = prepare_builtin(cfg, max_bytes=TINY, workers=1)
    assert os.path.isfile(f"{prefix}.bin") and os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))
    files = sorted(p for p in (tmp_path / "builtin").rglob("*") if p.is_file())
    stamp = {p: os.stat(p).st_mtime_ns for p in files}

    again = prepare_builtin(cfg, max_bytes=TINY, workers=1)  # idempotent: nothing rebuilt
    assert again == (prefix, tok_dir)
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamp
    assert not [p for p in (tmp_path / "builtin").rglob("*.tmp-*")]

    train, valid, tok = build_datasets(cfg, seq_len=32, seed=1, train_samples=100, valid_samples=8)
    assert isinstance(train, GPTDataset) and len(train) == 100 and len(valid) == 8
    assert tok.vocab_size <= 400 and tok.path == tok_dir
    x = train[0]["tokens"]
    assert x.shape == (33,) and x.dtype == np.int64 and x.max() < tok.vocab_size
    assert not set(train.doc_ids.tolist()) & set(valid.doc_ids.tolist())
    # same config and seed: same samples (what every rank relies on)
    train2, _, _ = build_datasets(cfg, seq_len=32, seed=1, train_samples=100, valid_samples=8)
    np.testing.assert_array_equal(train2[17]["tokens"], train[17]["tokens"])


def test_prepare_builtin_off():
    with pytest.raises(DataError, match="builtin_corpus"):
        prepare_builtin(DataConfig(builtin_corpus=False))


def test_parse_paths():
    assert parse_paths(["data/a"]) == [(None, "data/a")]
    assert parse_paths(["0.7 data/a", "0.3 data/b"]) == [(0.7, "data/a"), (0.3, "data/b")]
    assert parse_paths([0.7, "data/a", 0.3, "data/b"]) == [(0.7, "data/a"), (0.3, "data/b")]
    with pytest.raises(DataError, match="every dataset or for none"):
        parse_paths(["0.7 data/a", "data/b"])
    with pytest.raises(DataError, match="WEIGHT PREFIX"):
        parse_paths(["x data/a"])
    with pytest.raises(DataError, match="> 0"):
        parse_paths(["0 data/a"])


def test_build_datasets_blend_and_mismatch(tmp_path, tokenizer, other_tokenizer):
    for name, seed in (("a", 1), ("b", 2)):
        preprocess([write_jsonl(tmp_path / f"{name}.jsonl", make_docs(80, seed=seed))],
                   tokenizer.path, tmp_path / name, workers=1)
    cfg = DataConfig(paths=[f"0.75 {tmp_path / 'a'}", f"0.25 {tmp_path / 'b'}"], tokenizer=tokenizer.path)
    train, valid, tok = build_datasets(cfg, seq_len=16, seed=0, train_samples=200, valid_samples=20)
    assert isinstance(train, BlendedDataset) and len(train) == 200 and len(valid) == 20
    share = np.mean([train[i]["dataset_id"] == 0 for i in range(200)])
    assert abs(share - 0.75) < 0.01
    # the tokenizer recorded at preprocessing time is found when data.tokenizer is empty
    _, _, found = build_datasets(DataConfig(paths=[str(tmp_path / "a")]), 16, 0, 10, 10)
    assert found.hash == tokenizer.hash
    # a split without validation documents gives no valid dataset
    _, none, _ = build_datasets(DataConfig(paths=[str(tmp_path / "a")], split="100,0"), 16, 0, 10, 10)
    assert none is None
    bad = DataConfig(paths=[str(tmp_path / "a")], tokenizer=other_tokenizer.path)
    with pytest.raises(DataError, match="different tokenizer"):
        build_datasets(bad, 16, 0, 10, 10)
    with pytest.raises(DataError, match="no datasets"):
        build_datasets(DataConfig(), 16, 0, 10, 10)


def test_cli(tmp_path, capsys):
    from megads.data.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="megads")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(120, seed=9))
    with open(src, "a") as f:
        f.write("{broken\n")
    args = parser.parse_args(["tokenizer", "train", "--input", src, "--vocab-size", "300",
                              "--output", str(tmp_path / "tok")])
    assert args.func(args) == 0
    assert "vocab" in capsys.readouterr().out
    args = parser.parse_args(["preprocess", "--input", src, "--tokenizer", str(tmp_path / "tok"),
                              "--output-prefix", str(tmp_path / "ds"), "--workers", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "120 documents" in out and "1 skipped" in out and f"{src}:121: invalid JSON" in out
    args = parser.parse_args(["preprocess", "--input", src, "--tokenizer", str(tmp_path / "tok"),
                              "--output-prefix", str(tmp_path / "ds"), "--on-error", "fail", "--force"])
    with pytest.raises(DataError, match=f"{src}:121"):
        args.func(args)
