"""Memory-mapped indexed dataset: token ids in `PREFIX.bin`, their layout in `PREFIX.idx`.

The layout follows Megatron-Core's "MMIDIDX" format, so datasets are interchangeable:

    PREFIX.idx  (little-endian)
        magic          9 bytes  b"MMIDIDX\\x00\\x00"
        version        uint64   1
        dtype code     uint8    4 = int32, 8 = uint16 (Megatron's codes)
        num sequences  uint64   S
        num doc index  uint64   D + 1 (document boundaries, with a leading 0)
        sizes          int32[S]     tokens per sequence
        pointers       int64[S]     byte offset of each sequence in PREFIX.bin
        doc_idx        int64[D + 1] first sequence of each document; doc_idx[-1] == S
    PREFIX.bin      the sequences' token ids back to back, in the dtype above

A document is one or more sequences (usually one). Token ids are uint16 when the vocabulary fits
(< 65500) and int32 otherwise (`best_dtype`).
"""
from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from megads.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {4: np.int32, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, num sequences, num doc index


def best_dtype(vocab_size: int) -> type:
    """The smallest supported token dtype for a vocabulary: uint16 below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def index_file(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def exists(prefix: str | os.PathLike) -> bool:
    """True when both files of an indexed dataset are present."""
    return os.path.isfile(data_file(prefix)) and os.path.isfile(index_file(prefix))


class IndexedDatasetBuilder:
    """Streams documents into `PREFIX.bin/.idx`, written under temporary names until `finalize()`.

    Usage: `add_document(ids)` per document (or `add_item(ids)` per sequence and `end_document()`),
    then `finalize()`, which renames both files into place (.bin first, .idx last, so a reader never
    sees a new index over an old data file). As a context manager an exception discards the files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype} (use uint16 or int32)")
        self._max = np.iinfo(self.dtype).max
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp_bin = data_file(self.prefix) + tag
        self._tmp_idx = index_file(self.prefix) + tag
        self._bin = open(self._tmp_bin, "wb", buffering=1 << 20)
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._done = False

    # ---------------------------------------------------------------- writing
    def add_item(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one sequence (part of the current document)."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > self._max):
            raise DataError(f"{self.prefix}: token id out of range for {self.dtype} "
                            f"(min {int(arr.min())}, max {int(arr.max())})")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the last call)."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append a one-sequence document."""
        self.add_item(ids)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, sizes: Sequence[int]) -> None:
        """Append many one-sequence documents given back to back in `tokens` with lengths `sizes`."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != tokens.size:
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {tokens.size} tokens were given")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > self._max):
            raise DataError(f"{self.prefix}: token id out of range for {self.dtype} "
                            f"(min {int(tokens.min())}, max {int(tokens.max())})")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        start = len(self._sizes)
        self._sizes.extend(sizes.tolist())
        self._doc_idx.extend(range(start + 1, start + 1 + len(sizes)))

    def add_dataset(self, other: "IndexedDataset") -> None:
        """Append every document of another indexed dataset (same dtype or a narrower one)."""
        if np.dtype(other.dtype).itemsize > self.dtype.itemsize:
            raise DataError(f"{other.prefix}: {other.dtype} tokens do not fit this {self.dtype} dataset")
        step = 1 << 24  # copy the token data in 16M-token pieces
        for s in range(0, other.num_tokens, step):
            chunk = np.asarray(other.tokens[s:s + step])
            self._bin.write(chunk.astype(self.dtype, copy=False).tobytes())
        start = len(self._sizes)
        self._sizes.extend(np.asarray(other.sizes, dtype=np.int64).tolist())
        self._doc_idx.extend((np.asarray(other.doc_idx[1:], dtype=np.int64) + start).tolist())

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(sum(self._sizes))

    # ---------------------------------------------------------------- closing
    def finalize(self) -> None:
        """Write the index and move both files into place."""
        if self._done:
            return
        if len(self._doc_idx) == 0 or self._doc_idx[-1] != len(self._sizes):
            self.end_document()  # sequences added without a closing end_document()
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if len(self._sizes) else np.zeros(0, np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a sequence longer than 2^31 tokens")
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF[self.dtype], sizes.size, doc_idx.size))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        os.replace(self._tmp_bin, data_file(self.prefix))
        os.replace(self._tmp_idx, index_file(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Discard the temporary files; existing files under the prefix are left untouched."""
        if self._done:
            return
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        self._done = True

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view of `PREFIX.bin/.idx`.

    `ds[i]` is sequence i (a read-only numpy view); `ds.get(i, offset, length)` a slice of it.
    `sizes` [S] int32, `pointers` [S] int64, `doc_idx` [D + 1] int64 are memory-mapped arrays.
    The object pickles by prefix, so it can be sent to DataLoader workers.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx, bin_ = index_file(self.prefix), data_file(self.prefix)
        for p in (idx, bin_):
            if not os.path.isfile(p):
                raise DataError(f"{p}: indexed dataset file not found (make it with `megads preprocess`)")
        size = os.path.getsize(idx)
        with open(idx, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != MAGIC:
            raise DataError(f"{idx}: not an indexed dataset index (bad magic header)")
        _, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{idx}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx}: unsupported token dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        expect = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size != expect:
            raise DataError(f"{idx}: truncated or corrupt index ({size} bytes, header says {expect}); "
                            f"re-run `megads preprocess`")
        off = _HEADER.size
        self.sizes = np.memmap(idx, dtype="<i4", mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, np.int32)
        off += 4 * n_seq
        self.pointers = np.memmap(idx, dtype="<i8", mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, np.int64)
        off += 8 * n_seq
        self.doc_idx = np.memmap(idx, dtype="<i8", mode="r", offset=off, shape=(n_doc,)) if n_doc else np.zeros(0, np.int64)
        if n_doc < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n_seq or np.any(np.diff(self.doc_idx) < 0):
            raise DataError(f"{idx}: corrupt document index; re-run `megads preprocess`")
        itemsize = np.dtype(self.dtype).itemsize
        self.num_tokens = int(np.asarray(self.sizes, dtype=np.int64).sum())
        bin_size = os.path.getsize(bin_)
        if bin_size != self.num_tokens * itemsize:
            raise DataError(f"{bin_}: truncated or mismatched data file ({bin_size} bytes, index says "
                            f"{self.num_tokens * itemsize}); re-run `megads preprocess`")
        if n_seq and (int(self.pointers[0]) != 0 or
                      int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize != bin_size):
            raise DataError(f"{idx}: sequence pointers do not match {bin_}; re-run `megads preprocess`")
        self.tokens = (np.memmap(bin_, dtype=self.dtype, mode="r") if bin_size
                       else np.zeros(0, dtype=self.dtype))  # [num_tokens]

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        """Number of sequences."""
        return int(self.sizes.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_idx.shape[0]) - 1

    def _start(self, i: int) -> int:
        return int(self.pointers[i]) // np.dtype(self.dtype).itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range ({n} sequences)")
        s = self._start(i)
        return self.tokens[s:s + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        seq = self[i]
        end = seq.shape[0] if length is None else min(seq.shape[0], offset + length)
        return seq[offset:end]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences back to back)."""
        a, b = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if a == b:
            return self.tokens[0:0]
        return self.tokens[self._start(a):self._start(b - 1) + int(self.sizes[b - 1])]

    def doc_sequences(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The sequence ids of the given documents, in order ([sum of their sequence counts] int64)."""
        doc_ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        starts = np.asarray(self.doc_idx[doc_ids], dtype=np.int64)  # [n]
        counts = np.asarray(self.doc_idx[doc_ids + 1], dtype=np.int64) - starts  # [n]
        if np.all(counts == 1):  # the usual case: one sequence per document
            return starts
        # the ranges [start, start + count) back to back
        before = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [n] output position of each range
        return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - before, counts)

    def max_token(self) -> int:
        """Largest token id in the data (a full scan, in 16M-token pieces)."""
        best = -1
        step = 1 << 24
        for s in range(0, self.num_tokens, step):
            best = max(best, int(self.tokens[s:s + step].max()))
        return best

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, docs={self.num_docs}, sequences={len(self)}, "
                f"tokens={self.num_tokens}, dtype={np.dtype(self.dtype).name})")


def merge_datasets(prefixes: list[str], out_prefix: str | os.PathLike, dtype=None) -> IndexedDataset:
    """Concatenate several indexed datasets, in the given order, into `out_prefix` (atomically).

    The output dtype is the widest input dtype unless given. Used to join shards that were
    preprocessed separately (e.g. one `megads preprocess` per input file on several machines).
    """
    if not prefixes:
        raise DataError("merge: no datasets given")
    parts = [IndexedDataset(p) for p in prefixes]
    if dtype is None:
        dtype = max((np.dtype(p.dtype) for p in parts), key=lambda d: d.itemsize)
    with IndexedDatasetBuilder(out_prefix, dtype) as b:
        for p in parts:
            b.add_dataset(p)
    return IndexedDataset(out_prefix)
