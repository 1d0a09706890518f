"""Pre-training samples: fixed-length windows over documents, document splits, and blending.

GPTDataset follows Megatron's GPT dataset. For each epoch over a split's documents:
  1. doc order:    the split's documents in a random order (their sequences stay together);
  2. sample index: the epoch's token stream is cut every `seq_len` tokens; sample j starts at token
                   j * seq_len, stored as (position in the doc order, offset inside that sequence),
                   and holds seq_len + 1 tokens (inputs and shifted labels), so it runs across
                   document boundaries and every token is an input exactly once per epoch (up to
                   the < seq_len tokens left at the epoch's end);
  3. shuffle:      a permutation of the epoch's samples.
Epochs are concatenated, each with its own doc order and shuffle, until `num_samples` are served.
Epoch e draws from numpy RandomState([seed, e]): same seed, same samples.
"""
from __future__ import annotations

import collections
import math
from typing import NamedTuple, Sequence

import numpy as np

from megads.data.indexed import IndexedDataset
from megads.errors import DataError


# ---------------------------------------------------------------- splits

def parse_split(split: str | Sequence[float]) -> tuple[float, float]:
    """'98,2' (or [98, 2]) -> normalised (train, valid) shares."""
    parts = split.split(",") if isinstance(split, str) else list(split)
    try:
        vals = [float(p) for p in parts]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 2 or any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0:
        raise DataError(f"data.split: must be 'train,valid' non-negative numbers, got {split!r}")
    total = sum(vals)
    return vals[0] / total, vals[1] / total


def split_documents(num_docs: int, split: str | Sequence[float] = "98,2",
                    seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Randomly assign documents to (train, valid); both returned as sorted int64 ids.

    The split is disjoint and complete. With >= 2 documents, a positive valid share gets at least
    one document and a positive train share keeps at least one.
    """
    train_share, valid_share = parse_split(split)
    n_valid = int(round(num_docs * valid_share))
    if num_docs >= 2:
        if valid_share > 0:
            n_valid = max(n_valid, 1)
        if train_share > 0:
            n_valid = min(n_valid, num_docs - 1)
    perm = np.random.RandomState(seed).permutation(num_docs)
    valid = np.sort(perm[:n_valid]).astype(np.int64)
    train = np.sort(perm[n_valid:]).astype(np.int64)
    return train, valid


# ---------------------------------------------------------------- GPT samples

class Epoch(NamedTuple):
    """The index of one epoch (P = samples per epoch)."""

    doc_order: np.ndarray  # [docs] the split's document ids in this epoch's order
    seq_order: np.ndarray  # [seqs] their sequence ids, in order
    sample_pos: np.ndarray  # [P] index into seq_order where sample j starts
    sample_off: np.ndarray  # [P] token offset of sample j inside that sequence
    shuffle: np.ndarray  # [P] the epoch-local sample served at step k


class GPTDataset:
    """Fixed-length samples of `seq_len + 1` tokens over documents `doc_ids` of `indexed`.

    `ds[i]` -> {"tokens": int64 [seq_len + 1]}. len(ds) == num_samples (one epoch when None).
    Epoch e's index comes from RandomState([seed, e]) and is built when first needed (a few
    are cached), so construction is cheap and memory stays bounded however many epochs are asked.
    """

    cache_epochs = 4

    def __init__(self, indexed: IndexedDataset, doc_ids: Sequence[int] | np.ndarray, seq_len: int,
                 seed: int, num_samples: int | None = None, name: str = "train"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.indexed = indexed
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = int(seed)
        self._sizes = np.asarray(indexed.sizes, dtype=np.int64)  # [S]
        self.tokens_per_epoch = int(self._sizes[indexed.doc_sequences(self.doc_ids)].sum()) if self.doc_ids.size else 0
        # samples start every seq_len tokens and need seq_len + 1 of them
        self.samples_per_epoch = max(0, (self.tokens_per_epoch - 1) // seq_len)
        if self.samples_per_epoch == 0:
            raise DataError(f"{indexed.prefix}: the {name} split has {self.doc_ids.size} documents and "
                            f"{self.tokens_per_epoch} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                            f"use more data, a larger share in data.split, or a shorter train.seq_len")
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_epochs = max(1, -(-self.num_samples // self.samples_per_epoch))
        self._cache: collections.OrderedDict[int, Epoch] = collections.OrderedDict()

    def epoch(self, e: int) -> Epoch:
        """The (cached) index of epoch e."""
        hit = self._cache.get(e)
        if hit is not None:
            self._cache.move_to_end(e)
            return hit
        rng = np.random.RandomState([self.seed % 2**32, e])
        docs = self.doc_ids[rng.permutation(self.doc_ids.size)]
        seqs = self.indexed.doc_sequences(docs)
        cum = np.zeros(seqs.size + 1, dtype=np.int64)  # [seqs + 1] token offset of each sequence
        np.cumsum(self._sizes[seqs], out=cum[1:])
        starts = np.arange(self.samples_per_epoch, dtype=np.int64) * self.seq_len  # [P]
        pos = np.searchsorted(cum, starts, side="right") - 1  # skips empty sequences
        ep = Epoch(docs, seqs, pos, starts - cum[pos], rng.permutation(self.samples_per_epoch))
        self._cache[e] = ep
        if len(self._cache) > self.cache_epochs:
            self._cache.popitem(last=False)
        return ep

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, i: int) -> tuple[int, int]:
        """(epoch, epoch-local unshuffled sample index) of sample i."""
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        e, k = divmod(i, self.samples_per_epoch)
        return e, int(self.epoch(e).shuffle[k])

    def __getitem__(self, i: int) -> dict:
        e, j = self.locate(int(i))
        ep = self.epoch(e)
        pos, off = int(ep.sample_pos[j]), int(ep.sample_off[j])
        out = np.empty(self.seq_len + 1, dtype=np.int64)  # [seq_len + 1]
        filled = 0
        while filled < out.size:
            piece = self.indexed.get(int(ep.seq_order[pos]), off, out.size - filled)
            out[filled:filled + piece.size] = piece
            filled += piece.size
            pos, off = pos + 1, 0
        return {"tokens": out}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"GPTDataset({self.indexed.prefix!r}, docs={self.doc_ids.size}, seq_len={self.seq_len}, "
                f"samples={self.num_samples}, epochs={self.num_epochs})")


# ---------------------------------------------------------------- blending

def blending_index(weights: Sequence[float], size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic low-discrepancy assignment of `size` samples to datasets by weight.

    Dataset k's j-th sample is due at time (j + 1/2) / w_k; samples are served in order of due
    time, ties broken by a seeded order of the datasets. After any n samples dataset k has served
    n * w_k samples, give or take one (the same guarantee as Megatron's greedy error-minimising
    loop, computed with a sort instead of a Python loop).
    Returns (dataset_index [size] int64, sample_index_within_dataset [size] int64).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise DataError(f"blend weights must be positive numbers, got {list(weights)}")
    w = w / w.sum()
    priority = np.random.RandomState(seed).permutation(w.size)
    due, which, nth = [], [], []
    for k, wk in enumerate(w):
        n = int(math.ceil(size * wk)) + 1
        j = np.arange(n, dtype=np.int64)
        due.append((j + 0.5) / wk)
        which.append(np.full(n, k, dtype=np.int64))
        nth.append(j)
    due_a, which_a, nth_a = np.concatenate(due), np.concatenate(which), np.concatenate(nth)
    order = np.lexsort((priority[which_a], due_a))[:size]
    return which_a[order], nth_a[order]


class BlendedDataset:
    """Samples drawn from several datasets in proportion to `weights` (deterministic order).

    `ds[i]` -> the chosen dataset's sample dict plus "dataset_id". Each dataset must hold at least
    as many samples as the blend takes from it (`blend_counts` tells how many).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, seed: int):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.size = int(size)
        self.dataset_index, self.sample_index = blending_index(self.weights, self.size, seed)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for k, (ds, c) in enumerate(zip(self.datasets, counts)):
            if len(ds) < c:
                raise ValueError(f"dataset {k} has {len(ds)} samples but the blend needs {c}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range ({self.size} samples)")
        k = int(self.dataset_index[i])
        item = dict(self.datasets[k][int(self.sample_index[i])])
        item["dataset_id"] = k
        return item


def blend_counts(weights: Sequence[float], size: int, seed: int = 0) -> np.ndarray:
    """How many samples a BlendedDataset of `size` takes from each dataset ([K] int64)."""
    which, _ = blending_index(weights, size, seed)
    return np.bincount(which, minlength=len(weights)).astype(np.int64)
