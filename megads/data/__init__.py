"""Data pipeline: tokenizer, indexed datasets, pre-training samples, and the builtin corpus.

The trainer uses two entry points:
- `prepare_builtin(data_cfg)` (one process, before the others start): builds the stdlib corpus, a
  tokenizer and an indexed dataset under `data_cfg.data_dir`, or reuses them when present;
- `build_datasets(data_cfg, seq_len, seed, train_samples, valid_samples)` (every process):
  opens the datasets, checks them against the tokenizer, splits documents and blends.

`data_cfg.paths` lists indexed-dataset prefixes, each optionally preceded by a weight:
`["0.7 data/web", "0.3 data/code"]` (Megatron's flat form `[0.7, "data/web", 0.3, "data/code"]`
works too). Without weights several datasets are mixed in proportion to their token counts.
The builtin corpus is used when `data_cfg.paths` is empty and `data_cfg.builtin_corpus` is true.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megads.data.dataset import BlendedDataset, GPTDataset, blend_counts, split_documents
from megads.data.indexed import IndexedDataset, IndexedDatasetBuilder, exists, merge_datasets
from megads.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["build_datasets", "prepare_builtin", "builtin_paths", "parse_paths", "GPTDataset",
           "BlendedDataset", "IndexedDataset", "IndexedDatasetBuilder", "merge_datasets", "split_documents"]

BUILTIN_MAX_BYTES = 8_000_000


# ---------------------------------------------------------------- builtin corpus

def builtin_paths(data_cfg) -> tuple[str, str]:
    """(dataset prefix, tokenizer dir) of the builtin corpus for this config (nothing is built).

    Names carry the vocabulary size, so configs with different `vocab_size` do not clash.
    A user tokenizer (`data_cfg.tokenizer`) is used as is; the dataset name then carries its hash.
    """
    root = Path(data_cfg.data_dir)
    if data_cfg.tokenizer:
        from megads.data.tokenizer import load_tokenizer

        tok = load_tokenizer(data_cfg.tokenizer)
        return str(root / f"stdlib_{tok.hash[:10]}"), tok.path
    return str(root / f"stdlib_v{data_cfg.vocab_size}"), str(root / f"tokenizer_v{data_cfg.vocab_size}")


def prepare_builtin(data_cfg, max_bytes: int = BUILTIN_MAX_BYTES, workers: int | None = None) -> tuple[str, str]:
    """Build (or reuse) the builtin corpus, tokenizer and dataset; return (prefix, tokenizer dir).

    Idempotent: a stamp file records which corpus and tokenizer the dataset was made from; when
    all three are present and agree nothing is rebuilt. Everything is written atomically, so an
    interrupted run is simply redone by the next call.
    """
    from megads.data.corpus import build_builtin_corpus
    from megads.data.preprocess import preprocess, read_meta
    from megads.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_hash, train_tokenizer

    if not data_cfg.builtin_corpus:
        raise DataError("data.builtin_corpus is false: nothing to prepare (set it to true, or give "
                        "data.paths made with `megads preprocess`)")
    root = Path(data_cfg.data_dir)
    prefix, tok_dir = builtin_paths(data_cfg)
    shards = build_builtin_corpus(root / "corpus", max_bytes=max_bytes)
    corpus_id = (root / "corpus" / "manifest.json").read_text(encoding="utf-8")
    stamp_path = Path(f"{prefix}.build.json")
    stamp = _read_json(stamp_path)
    tok_file = Path(tok_dir) / TOKENIZER_FILE
    user_tok = bool(data_cfg.tokenizer)

    tok_ok = tok_file.is_file() and (user_tok or (
        stamp.get("corpus") == corpus_id and stamp.get("tokenizer_hash") == tokenizer_hash(tok_file)))
    if not tok_ok:
        log.info("training a %d-token tokenizer on %s", data_cfg.vocab_size, root / "corpus")
        train_tokenizer(shards, data_cfg.vocab_size, tok_dir)
    tok = load_tokenizer(tok_dir)
    meta = read_meta(prefix) or {}
    data_ok = (tok_ok and exists(prefix) and meta.get("tokenizer_hash") == tok.hash
               and stamp.get("corpus") == corpus_id and stamp.get("dataset_tokens") == meta.get("tokens"))
    if data_ok:
        try:
            IndexedDataset(prefix)  # header and size checks only: rebuild a damaged dataset
        except DataError as e:
            log.warning("rebuilding the builtin dataset: %s", e)
            data_ok = False
    if not data_ok:
        n = workers if workers is not None else (data_cfg.num_workers or os.cpu_count() or 1)
        stats = preprocess(shards, tok_dir, prefix, workers=n, on_error="fail")
        log.info("builtin dataset %s: %d documents, %d tokens", prefix, stats["documents"], stats["tokens"])
        stamp = {"corpus": corpus_id, "tokenizer_hash": tok.hash, "dataset_tokens": stats["tokens"]}
        tmp = stamp_path.with_name(stamp_path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, stamp_path)
    return prefix, tok_dir


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- datasets

def parse_paths(paths) -> list[tuple[float | None, str]]:
    """data.paths -> [(weight or None, prefix)]; weights must be given for all entries or none."""
    if isinstance(paths, str):
        paths = [paths]
    out: list[tuple[float | None, str]] = []
    pending: float | None = None
    for item in paths or []:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            pending = float(item)  # Megatron's flat form: weight, prefix, weight, prefix
            continue
        parts = str(item).split()
        if len(parts) == 2:
            try:
                w = float(parts[0])
            except ValueError:
                raise DataError(f"data.paths: {item!r}: expected 'WEIGHT PREFIX' or 'PREFIX'") from None
            out.append((w, parts[1]))
        elif len(parts) == 1:
            out.append((pending, parts[0]))
        else:
            raise DataError(f"data.paths: {item!r}: expected 'WEIGHT PREFIX' or 'PREFIX'")
        pending = None
    weighted = [w is not None for w, _ in out]
    if any(weighted) and not all(weighted):
        raise DataError("data.paths: give a weight for every dataset or for none")
    for w, p in out:
        if w is not None and not w > 0:
            raise DataError(f"data.paths: weight of {p} must be > 0, got {w}")
    return out


def _make_split(kind: str, indexed: list[IndexedDataset], docs: list, weights: list[float],
                seq_len: int, size: int | None, seed: int):
    """One GPTDataset, or a BlendedDataset over the datasets whose split has documents (None if none)."""
    present = [k for k in range(len(indexed)) if docs[k].size]
    if not present:
        return None

    def gpt(k: int, n: int | None) -> GPTDataset:
        return GPTDataset(indexed[k], docs[k], seq_len, seed + k, n, kind)

    if len(present) == 1:
        return gpt(present[0], size)
    w = [weights[k] for k in present]
    if size is None:  # one epoch of everything
        size = sum(len(gpt(k, None)) for k in present)
    counts = blend_counts(w, size, seed)
    return BlendedDataset([gpt(k, max(1, int(c))) for k, c in zip(present, counts)], w, size, seed)


def build_datasets(data_cfg, seq_len: int, seed: int, train_samples: int | None,
                   valid_samples: int | None):
    """-> (train dataset, valid dataset or None, tokenizer or None).

    Samples are dicts with "tokens" (int64 [seq_len + 1]). The valid dataset is None when the
    split gives validation no documents (e.g. split "100,0").
    """
    from megads.data.preprocess import check_compatible, read_meta
    from megads.data.tokenizer import load_tokenizer

    entries = parse_paths(data_cfg.paths)
    tok_path = data_cfg.tokenizer or None
    if not entries:
        if not data_cfg.builtin_corpus:
            raise DataError("data.paths: no datasets given (list indexed-dataset prefixes made with "
                            "`megads preprocess`, or set data.builtin_corpus: true)")
        prefix, tok_path = builtin_paths(data_cfg)
        if not (os.path.isfile(f"{prefix}.idx") and os.path.isfile(os.path.join(tok_path, "tokenizer.json"))):
            raise DataError(f"{prefix}: builtin dataset not prepared (run `megads prepare-data CONFIG`)")
        entries = [(None, prefix)]
    if tok_path is None:  # fall back to the tokenizer recorded at preprocessing time
        meta = read_meta(entries[0][1]) or {}
        recorded = meta.get("tokenizer_path")
        if recorded and os.path.isfile(os.path.join(recorded, "tokenizer.json")):
            tok_path = recorded
        elif recorded:  # made with a tokenizer that has gone: training without one would be silent nonsense
            raise DataError(f"{entries[0][1]}: made with the tokenizer {recorded} (recorded in its .meta.json), "
                            f"which is gone; set data.tokenizer to it (or to a copy: the hash is checked)")
    tokenizer = load_tokenizer(tok_path) if tok_path else None

    indexed = []
    for _, prefix in entries:
        ds = IndexedDataset(prefix)
        if tokenizer is not None:
            check_compatible(prefix, tokenizer, ds)
        indexed.append(ds)
    weights = [w if w is not None else float(ds.num_tokens) for (w, _), ds in zip(entries, indexed)]
    if sum(weights) <= 0:
        raise DataError("data.paths: the datasets hold no tokens")

    splits = [split_documents(ds.num_docs, data_cfg.split, seed + k) for k, ds in enumerate(indexed)]
    train = _make_split("train", indexed, [t for t, _ in splits], weights, seq_len, train_samples, seed)
    if train is None:
        raise DataError(f"data.split: {data_cfg.split!r} leaves no documents for training")
    valid = _make_split("valid", indexed, [v for _, v in splits], weights, seq_len, valid_samples, seed + 7919)
    return train, valid, tokenizer
