"""Fixtures of the data tests: a small mixed-script corpus and a tokenizer trained on it (~400 tokens)."""
from __future__ import annotations

import pytest

from data_helpers import make_docs, write_jsonl
from megads.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_jsonl(d / "a.jsonl", make_docs(300, seed=1))
    write_jsonl(d / "b.jsonl", make_docs(200, seed=2))
    return d


@pytest.fixture(scope="session")
def tokenizer(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([str(corpus_dir / "a.jsonl"), str(corpus_dir / "b.jsonl")], 400, out)


@pytest.fixture(scope="session")
def other_tokenizer(corpus_dir, tmp_path_factory):
    """A different tokenizer (other vocabulary size) for mismatch tests."""
    out = tmp_path_factory.mktemp("tok2")
    return train_tokenizer([str(corpus_dir / "b.jsonl")], 300, out)
