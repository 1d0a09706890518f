"""Preprocess: determinism across worker counts, malformed lines, empty corpora, tokenizer mismatch."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from data_helpers import make_docs, write_jsonl
from megads.data.indexed import IndexedDataset
from megads.data.preprocess import check_compatible, preprocess, read_meta
from megads.errors import DataError


def read_files(prefix) -> tuple[bytes, bytes]:
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


def test_contents_and_meta(tmp_path, corpus_dir, tokenizer):
    docs = make_docs(50, seed=7)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    stats = preprocess([src], tokenizer.path, tmp_path / "out", workers=1)
    assert stats["documents"] == 50 and stats["skipped"] == 0
    ds = IndexedDataset(tmp_path / "out")
    assert ds.num_docs == 50 and ds.num_tokens == stats["tokens"]
    for i, d in enumerate(docs):
        assert ds[i].tolist() == tokenizer.encode(d) + [tokenizer.eos_id]
    meta = read_meta(tmp_path / "out")
    assert meta["tokenizer_hash"] == tokenizer.hash and meta["vocab_size"] == tokenizer.vocab_size
    assert meta["max_token_id"] == int(max(ds.max_token(), 0))
    check_compatible(tmp_path / "out", tokenizer)  # no error


def test_workers_give_identical_output(tmp_path, corpus_dir, tokenizer, monkeypatch):
    import megads.data.preprocess as pre

    monkeypatch.setattr(pre, "CHUNK_RECORDS", 37)  # many chunks, so the pool really interleaves
    inputs = [str(corpus_dir / "a.jsonl"), str(corpus_dir / "b.jsonl")]
    s1 = preprocess(inputs, tokenizer.path, tmp_path / "w1", workers=1)
    s2 = preprocess(inputs, tokenizer.path, tmp_path / "w2", workers=2)
    assert s1["documents"] == s2["documents"] == 500
    assert read_files(tmp_path / "w1") == read_files(tmp_path / "w2")


def test_text_files_and_gzip(tmp_path, tokenizer):
    txt = tmp_path / "notes.txt"
    txt.write_text("first para\nline two\n\n\n  \nsecond 🙂\n\nthird", encoding="utf-8")
    gz = tmp_path / "more.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped"}) + "\n")
    stats = preprocess([str(txt), str(gz)], tokenizer.path, tmp_path / "out", json_key="body",
                       workers=1, append_eos=False)
    ds = IndexedDataset(tmp_path / "out")
    texts = [tokenizer.decode(ds[i]) for i in range(len(ds))]
    assert texts == ["first para\nline two", "second 🙂", "third", "zipped"]
    assert stats["documents"] == 4


def bad_file(tmp_path) -> str:
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"other": "missing key"}),
        "",
        json.dumps({"text": 5}),
        json.dumps(["a list"]),
        json.dumps({"text": "good two"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    return str(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_lines_skipped_and_counted(tmp_path, tokenizer, workers):
    path = bad_file(tmp_path)
    stats = preprocess([path], tokenizer.path, tmp_path / "out", workers=workers, on_error="skip")
    assert stats["documents"] == 2 and stats["skipped"] == 5
    errs = stats["errors"]
    assert errs[0].startswith(f"{path}:2: invalid JSON")
    assert errs[1] == f"{path}:3: missing field 'text'"
    assert errs[2] == f"{path}:5: field 'text' is int, expected a string"
    assert errs[3] == f"{path}:6: expected a JSON object, got list"
    assert errs[4].startswith(f"{path}:8: invalid UTF-8")
    ds = IndexedDataset(tmp_path / "out")
    assert [tokenizer.decode(ds[i], skip_special_tokens=True) for i in range(2)] == ["good one", "good two"]


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_line_fatal(tmp_path, tokenizer, workers):
    path = bad_file(tmp_path)
    preprocess([str(tmp_path / "bad.jsonl")], tokenizer.path, tmp_path / "out", on_error="skip", workers=1)
    before = read_files(tmp_path / "out")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        preprocess([path], tokenizer.path, tmp_path / "out", workers=workers, on_error="fail")
    assert read_files(tmp_path / "out") == before  # nothing overwritten
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_empty_corpus(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        preprocess([str(empty)], tokenizer.path, tmp_path / "out", workers=1)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"x": 1}\n')
    with pytest.raises(DataError, match=r"no documents.*1 malformed"):
        preprocess([str(only_bad)], tokenizer.path, tmp_path / "out", workers=1)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_bad_arguments(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        preprocess([str(tmp_path / "missing.jsonl")], tokenizer.path, tmp_path / "out")
    src = write_jsonl(tmp_path / "in.jsonl", ["a"])
    with pytest.raises(DataError, match="on_error"):
        preprocess([src], tokenizer.path, tmp_path / "out", on_error="ignore")
    with pytest.raises(DataError, match="no tokenizer"):
        preprocess([src], tmp_path, tmp_path / "out")


def test_tokenizer_mismatch(tmp_path, tokenizer, other_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(30, seed=3))
    preprocess([src], tokenizer.path, tmp_path / "out", workers=1)
    with pytest.raises(DataError, match="different tokenizer"):
        check_compatible(tmp_path / "out", other_tokenizer)
    # without metadata (a foreign dataset) the ids are scanned against the vocabulary
    os.remove(tmp_path / "out.meta.json")
    assert IndexedDataset(tmp_path / "out").max_token() >= other_tokenizer.vocab_size
    with pytest.raises(DataError, match="outside the vocabulary"):
        check_compatible(tmp_path / "out", other_tokenizer)
    check_compatible(tmp_path / "out", tokenizer)


def test_token_ids_beyond_vocab(tmp_path, tokenizer):
    from megads.data.indexed import IndexedDatasetBuilder

    with IndexedDatasetBuilder(tmp_path / "foreign", np.uint16) as b:
        b.add_document([1, 2, tokenizer.vocab_size + 5])
    with pytest.raises(DataError, match=rf"token id {tokenizer.vocab_size + 5} is outside"):
        check_compatible(tmp_path / "foreign", tokenizer)
