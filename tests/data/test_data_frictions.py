"""First-hour frictions of the data commands: a vocabulary larger than the data allows says what it
made; preprocess does not overwrite a dataset without --force; a dataset whose recorded tokenizer
is gone is an error, not a run without a tokenizer."""
from __future__ import annotations

import json
import shutil

import pytest

from megads.cli import main
from megads.config import DataConfig
from megads.data import build_datasets
from megads.errors import DataError


def corpus(path, n=60):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc {i}: alpha beta gamma delta {i * 7 % 13}\n"}) + "\n")
    return str(path)


def test_tokenizer_says_when_the_data_allows_fewer_tokens(tmp_path, capsys):
    src = corpus(tmp_path / "in.jsonl")
    assert main(["tokenizer", "train", "--input", src, "--vocab-size", "5000", "--output", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    made = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["vocab_size"]
    assert made < 5000
    assert f"note: --vocab-size 5000 asked for, {made} made" in out and f"model.vocab_size >= {made}" in out
    # enough data for the size asked: no note
    assert main(["tokenizer", "train", "--input", src, "--vocab-size", "280", "--output", str(tmp_path / "tok2")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_preprocess_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = corpus(tmp_path / "in.jsonl")
    assert main(["tokenizer", "train", "--input", src, "--vocab-size", "280", "--output", str(tmp_path / "tok")]) == 0
    args = ["preprocess", "--input", src, "--tokenizer", str(tmp_path / "tok"), "--output-prefix", str(tmp_path / "ds"),
            "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    before = {s: (tmp_path / f"ds{s}").read_bytes() for s in (".bin", ".idx", ".meta.json")}
    other = corpus(tmp_path / "other.jsonl", n=10)
    assert main([*args[:2], other, *args[3:]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ds.bin exists; pass --force" in err
    assert {s: (tmp_path / f"ds{s}").read_bytes() for s in before} == before  # nothing overwritten
    assert main([*args[:2], other, *args[3:], "--force"]) == 0
    assert "10 documents" in capsys.readouterr().out


def test_a_dataset_whose_tokenizer_is_gone_is_an_error(tmp_path, capsys):
    src = corpus(tmp_path / "in.jsonl")
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", src, "--vocab-size", "280", "--output", str(tok)]) == 0
    assert main(["preprocess", "--input", src, "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "ds"),
                 "--workers", "1"]) == 0
    cfg = DataConfig(paths=[str(tmp_path / "ds")], split="90,10")
    _, _, found = build_datasets(cfg, 16, 0, 10, 10)
    assert found is not None and found.path == str(tok.resolve())  # the recorded tokenizer is used
    shutil.move(str(tok), str(tmp_path / "moved"))
    with pytest.raises(DataError, match="which is gone; set data.tokenizer"):
        build_datasets(cfg, 16, 0, 10, 10)
    # pointing data.tokenizer at the moved copy works (same hash)
    _, _, found = build_datasets(DataConfig(paths=[str(tmp_path / "ds")], tokenizer=str(tmp_path / "moved"),
                                            split="90,10"), 16, 0, 10, 10)
    assert found is not None
