"""Tokenise JSONL/text files into an indexed dataset, in parallel and streaming.

The parent process reads the inputs record by record (see sources.py for the two input kinds) and
groups them into chunks of ~1 MiB; a process pool decodes, parses and tokenises each chunk; the
parent writes the results into one IndexedDatasetBuilder in input order. At most a few chunks per
worker are in flight, so memory stays flat whatever the corpus size, and the output is byte-identical
for any number of workers.

Besides PREFIX.bin/.idx the run writes PREFIX.meta.json: the tokenizer's hash and vocabulary size and
the largest token id, which `check_compatible` uses to catch a dataset paired with the wrong tokenizer.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from megads.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megads.data.sources import check_inputs, is_json_lines, iter_records, parse_record
from megads.data.tokenizer import Tokenizer, load_tokenizer
from megads.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # raw input bytes per work item
CHUNK_RECORDS = 4096  # records per work item at most
META_SUFFIX = ".meta.json"


def meta_file(prefix: str | os.PathLike) -> str:
    return f"{prefix}{META_SUFFIX}"


# ---------------------------------------------------------------- work items

def _chunks(inputs: list[str]) -> Iterator[tuple[str, bool, list[tuple[int, bytes]]]]:
    """(file, is-jsonl, [(line, raw record), ...]) work items of at most ~CHUNK_BYTES, in input order."""
    for path in inputs:
        json_lines = is_json_lines(path)
        batch: list[tuple[int, bytes]] = []
        nbytes = 0
        for line, raw in iter_records(path):
            batch.append((line, raw))
            nbytes += len(raw)
            if nbytes >= CHUNK_BYTES or len(batch) >= CHUNK_RECORDS:
                yield path, json_lines, batch
                batch, nbytes = [], 0
        if batch:
            yield path, json_lines, batch


class _ChunkWorker:
    """Decodes and tokenises one work item. Lives once per worker process (or in the parent)."""

    def __init__(self, tokenizer_path: str, json_key: str, append_eos: bool):
        self.tok = load_tokenizer(tokenizer_path)
        self.json_key = json_key
        self.eos = self.tok.eos_id if append_eos else None
        if append_eos and self.eos is None:
            raise DataError(f"{tokenizer_path}: append_eos needs an <|eos|> token, which this tokenizer lacks")

    def __call__(self, item):
        """-> (file, tokens [N], sizes [docs], errors [(line, reason)], empty docs dropped)."""
        path, json_lines, records = item
        texts, errors = [], []
        for line, raw in records:
            text, reason = parse_record(raw, json_lines, self.json_key)
            if reason is None:
                texts.append(text)
            else:
                errors.append((line, reason))
        docs = self.tok.encode_batch(texts) if texts else []
        if self.eos is not None:
            docs = [d + [self.eos] for d in docs]
        sizes = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        empty = int((sizes == 0).sum())
        tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=int(sizes.sum()))
        sizes = sizes[sizes > 0]
        return path, tokens, sizes, errors, empty


_WORKER: _ChunkWorker | None = None
_WORKER_ERROR: BaseException | None = None


def _init_worker(tokenizer_path: str, json_key: str, append_eos: bool) -> None:
    global _WORKER, _WORKER_ERROR
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    try:
        _WORKER = _ChunkWorker(tokenizer_path, json_key, append_eos)
    except Exception as e:  # raised from the first task: a failing initializer would be respawned forever
        _WORKER_ERROR = e


def _run_chunk(item):
    if _WORKER is None:
        raise _WORKER_ERROR or RuntimeError("preprocess worker not initialised")
    return _WORKER(item)


def _pool(workers: int, initargs: tuple):
    """A process pool: fork where available (fast, no re-import of __main__), else spawn.

    TOKENIZERS_PARALLELISM is set while the workers fork so that `tokenizers` in the children
    neither warns nor uses a thread pool inherited half-alive from the parent.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=initargs)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _results(inputs, tokenizer_path, json_key, append_eos, workers):
    """Yield the chunk results in input order, with at most 2 * workers + 2 chunks in flight."""
    items = _chunks(inputs)
    if workers <= 1:
        worker = _ChunkWorker(tokenizer_path, json_key, append_eos)
        for item in items:
            yield worker(item)
        return
    with _pool(workers, (tokenizer_path, json_key, append_eos)) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(_run_chunk, (item,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- the run

def preprocess(inputs: list[str], tokenizer_path: str | os.PathLike, output_prefix: str | os.PathLike,
               json_key: str = "text", workers: int | None = None, on_error: str = "skip",
               append_eos: bool = True, max_reported: int = 20) -> dict:
    """Tokenise `inputs` into `output_prefix`.bin/.idx/.meta.json and return run statistics.

    on_error="skip" skips a malformed record (bad UTF-8 or JSON, missing or non-string field) and
    counts it in stats["skipped"] (the first `max_reported` messages are in stats["errors"] and the
    log); on_error="fail" raises DataError("file:line: reason") and leaves existing outputs untouched.
    Documents that tokenise to nothing (empty text without EOS) are dropped and counted in
    stats["empty"]. Zero documents in the end is a DataError.
    """
    t0 = time.perf_counter()
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error: must be 'skip' or 'fail', got {on_error!r}")
    inputs = check_inputs([str(p) for p in inputs])
    tok = load_tokenizer(tokenizer_path)
    tokenizer_file = str(Path(tok.path) / "tokenizer.json")
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    dtype = best_dtype(tok.vocab_size)
    prefix = str(output_prefix)
    stats = {"documents": 0, "tokens": 0, "skipped": 0, "empty": 0, "errors": [], "files": len(inputs),
             "output_prefix": prefix, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
             "workers": workers}
    max_id = -1
    builder = IndexedDatasetBuilder(prefix, dtype)
    results = _results(inputs, tokenizer_file, json_key, append_eos, workers)
    try:
        for path, tokens, sizes, errors, empty in results:
            for line, reason in errors:
                msg = f"{path}:{line}: {reason}"
                if on_error == "fail":
                    raise DataError(msg)
                stats["skipped"] += 1
                if len(stats["errors"]) < max_reported:
                    stats["errors"].append(msg)
                    log.info("skipped %s", msg)
            stats["empty"] += empty
            if sizes.size:
                builder.add_documents(tokens, sizes)
                stats["documents"] += int(sizes.size)
                stats["tokens"] += int(tokens.size)
                max_id = max(max_id, int(tokens.max()))
        if stats["documents"] == 0:
            detail = f" ({stats['skipped']} malformed records skipped)" if stats["skipped"] else ""
            raise DataError(f"no documents found in {', '.join(inputs)}{detail}")
        meta = {"format": "megads-indexed-v1", "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
                "tokenizer_path": os.path.abspath(tok.path), "dtype": np.dtype(dtype).name,
                "documents": stats["documents"], "tokens": stats["tokens"], "max_token_id": max_id,
                "json_key": json_key, "append_eos": append_eos, "skipped": stats["skipped"],
                "inputs": [os.path.abspath(p) for p in inputs]}
        tmp_meta = f"{meta_file(prefix)}.tmp-{os.getpid()}"
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        builder.finalize()
        os.replace(tmp_meta, meta_file(prefix))
    except BaseException:
        builder.abort()
        raise
    finally:
        results.close()  # stops the pool at once on an error
    stats["seconds"] = time.perf_counter() - t0
    log.info("preprocess %s: %d documents, %d tokens, %d skipped, %.1f s", prefix, stats["documents"],
             stats["tokens"], stats["skipped"], stats["seconds"])
    return stats


def read_meta(prefix: str | os.PathLike) -> dict | None:
    """PREFIX.meta.json as a dict, or None when the dataset has none (e.g. made by Megatron)."""
    path = meta_file(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset metadata ({e})") from None


def check_compatible(prefix: str | os.PathLike, tokenizer: Tokenizer,
                     dataset: IndexedDataset | None = None) -> None:
    """Raise DataError unless the dataset at `prefix` can be read with `tokenizer`.

    With PREFIX.meta.json: the tokenizer hash must match and the largest token id must be below
    the tokenizer's vocabulary. Without it (a foreign dataset) the token ids are scanned.
    """
    meta = read_meta(prefix)
    fix = (f"re-run `megads preprocess --tokenizer {tokenizer.path}` or point data.tokenizer at the "
           f"tokenizer the data was made with")
    if meta is not None:
        made_with = meta.get("tokenizer_hash")
        if made_with and made_with != tokenizer.hash:
            raise DataError(f"{prefix}: dataset was tokenised with a different tokenizer "
                            f"({meta.get('tokenizer_path', '?')}, hash {made_with[:12]}) than "
                            f"{tokenizer.path} (hash {tokenizer.hash[:12]}); {fix}")
        max_id = int(meta.get("max_token_id", -1))
    else:
        ds = dataset if dataset is not None else IndexedDataset(prefix)
        max_id = ds.max_token()
    if max_id >= tokenizer.vocab_size:
        raise DataError(f"{prefix}: token id {max_id} is outside the vocabulary of {tokenizer.path} "
                        f"({tokenizer.vocab_size} tokens); {fix}")
