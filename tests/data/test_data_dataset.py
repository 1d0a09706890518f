"""GPTDataset, BlendedDataset and document splits against brute-force references."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from megads.data.dataset import (BlendedDataset, GPTDataset, blend_counts, blending_index, parse_split,
                                 split_documents)
from megads.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megads.errors import DataError


def build(tmp_path, name="ds", n_docs=30, seed=0, multi=False) -> IndexedDataset:
    """Documents of distinct token values (doc d holds values 1000*d + position) for easy checking."""
    rng = np.random.RandomState(seed)
    with IndexedDatasetBuilder(tmp_path / name, np.int32) as b:
        for d in range(n_docs):
            toks = 1000 * d + np.arange(rng.randint(1, 40))
            if multi and toks.size > 3:  # a document of two sequences
                b.add_item(toks[:3])
                b.add_item(toks[3:])
                b.end_document()
            else:
                b.add_document(toks)
    return IndexedDataset(tmp_path / name)


def brute_stream(ds: IndexedDataset, doc_order) -> np.ndarray:
    return np.concatenate([np.asarray(ds.document(int(d))) for d in doc_order])


@pytest.mark.parametrize("multi", [False, True])
def test_samples_match_brute_force_concatenation(tmp_path, multi):
    ds = build(tmp_path, multi=multi)
    docs = np.arange(0, 30, 2)  # a split: the even documents
    L = 7
    g = GPTDataset(ds, docs, L, seed=3, num_samples=None)
    stream = brute_stream(ds, g.epoch(0).doc_order)
    assert sorted(g.epoch(0).doc_order.tolist()) == docs.tolist()
    assert g.samples_per_epoch == (stream.size - 1) // L == len(g)
    for i in range(len(g)):
        epoch, j = g.locate(i)
        x = g[i]["tokens"]
        assert x.dtype == np.int64 and x.shape == (L + 1,)
        np.testing.assert_array_equal(x, stream[j * L: j * L + L + 1])


def test_every_token_once_per_epoch(tmp_path):
    ds = build(tmp_path)
    docs = np.arange(30)
    L = 5
    g = GPTDataset(ds, docs, L, seed=0, num_samples=None)
    inputs = np.concatenate([g[i]["tokens"][:-1] for i in range(len(g))])
    stream = brute_stream(ds, g.epoch(0).doc_order)
    covered = stream[: g.samples_per_epoch * L]
    assert inputs.size == covered.size
    assert collections.Counter(inputs.tolist()) == collections.Counter(covered.tolist())
    assert stream.size - covered.size <= L  # only the tail of the epoch is left out
    assert len(set(inputs.tolist())) == inputs.size  # every token value is unique here: no repeats


def test_multiple_epochs_reshuffle(tmp_path):
    ds = build(tmp_path)
    g = GPTDataset(ds, np.arange(30), 6, seed=1, num_samples=None)
    P = g.samples_per_epoch
    g3 = GPTDataset(ds, np.arange(30), 6, seed=1, num_samples=2 * P + 3)
    assert len(g3) == 2 * P + 3 and g3.num_epochs == 3
    assert not np.array_equal(g3.epoch(0).doc_order, g3.epoch(1).doc_order)
    for e in range(2):  # each full epoch covers the data once
        inputs = np.concatenate([g3[e * P + k]["tokens"][:-1] for k in range(P)])
        stream = brute_stream(ds, g3.epoch(e).doc_order)[: P * 6]
        assert sorted(inputs.tolist()) == sorted(stream.tolist())
    with pytest.raises(IndexError):
        g3[2 * P + 3]


def test_determinism_and_seeds(tmp_path):
    ds = build(tmp_path)
    a = GPTDataset(ds, np.arange(30), 8, seed=11, num_samples=50)
    b = GPTDataset(ds, np.arange(30), 8, seed=11, num_samples=50)
    c = GPTDataset(ds, np.arange(30), 8, seed=12, num_samples=50)
    A = np.stack([a[i]["tokens"] for i in range(50)])
    np.testing.assert_array_equal(A, np.stack([b[i]["tokens"] for i in range(50)]))
    assert not np.array_equal(A, np.stack([c[i]["tokens"] for i in range(50)]))


def test_too_few_tokens(tmp_path):
    ds = build(tmp_path, n_docs=2)
    with pytest.raises(DataError, match="valid split.*fewer than seq_len"):
        GPTDataset(ds, [0], 1000, seed=0, name="valid")


def test_split_disjoint_and_complete():
    for n in (1, 2, 3, 10, 101, 1000):
        for split in ("98,2", "50,50", "100,0", "0,1", "1,0.001"):
            tr, va = split_documents(n, split, seed=5)
            assert sorted(np.concatenate([tr, va]).tolist()) == list(range(n))
            assert not set(tr.tolist()) & set(va.tolist())
            tshare, vshare = parse_split(split)
            if n >= 2 and vshare > 0:
                assert va.size >= 1
            if n >= 2 and tshare > 0:
                assert tr.size >= 1
            if vshare == 0:
                assert va.size == 0
    tr, va = split_documents(1000, "98,2", seed=5)
    assert va.size == 20
    assert np.array_equal(split_documents(1000, "98,2", seed=5)[1], va)
    assert not np.array_equal(split_documents(1000, "98,2", seed=6)[1], va)
    with pytest.raises(DataError, match="data.split"):
        split_documents(10, "98")


def test_blending_index_proportions():
    w = [0.5, 0.3, 0.2]
    which, nth = blending_index(w, 10_000, seed=0)
    counts = np.bincount(which, minlength=3)
    np.testing.assert_allclose(counts / 10_000, w, atol=1e-3)
    # low discrepancy: every prefix is within ~1 sample of its target
    running = np.stack([np.cumsum(which == k) for k in range(3)], 1)
    target = np.arange(1, 10_001)[:, None] * np.array(w)[None]
    assert np.abs(running - target).max() <= 1.5
    # the j-th pick of a dataset is its sample j
    for k in range(3):
        assert nth[which == k].tolist() == list(range(counts[k]))
    assert np.array_equal(blending_index(w, 10_000, seed=0)[0], which)
    assert blend_counts(w, 10_000).tolist() == counts.tolist()
    with pytest.raises(DataError, match="positive"):
        blending_index([1.0, 0.0], 10)


def test_blended_dataset(tmp_path):
    d1, d2 = build(tmp_path, "a", seed=1), build(tmp_path, "b", seed=2)
    size = 400
    weights = [0.7, 0.3]
    n = blend_counts(weights, size, seed=4)
    g1 = GPTDataset(d1, np.arange(30), 4, seed=1, num_samples=int(n[0]))
    g2 = GPTDataset(d2, np.arange(30), 4, seed=2, num_samples=int(n[1]))
    bl = BlendedDataset([g1, g2], weights, size, seed=4)
    ids = np.array([bl[i]["dataset_id"] for i in range(size)])
    assert abs((ids == 0).mean() - 0.7) < 0.01
    bl2 = BlendedDataset([g1, g2], weights, size, seed=4)
    for i in range(0, size, 37):
        np.testing.assert_array_equal(bl[i]["tokens"], bl2[i]["tokens"])
    k, j = int(bl.dataset_index[5]), int(bl.sample_index[5])
    np.testing.assert_array_equal(bl[5]["tokens"], [g1, g2][k][j]["tokens"])
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([g1, GPTDataset(d2, np.arange(30), 4, seed=2, num_samples=1)], weights, size, seed=4)


def test_many_epochs_are_lazy_and_pickle(tmp_path):
    import pickle

    ds = build(tmp_path)
    g = GPTDataset(ds, [0, 1, 2], 4, seed=0, num_samples=10**9)  # millions of epochs: built on demand
    assert len(g) == 10**9 and g.num_epochs > 10**6
    last = g[10**9 - 1]["tokens"]
    g2 = pickle.loads(pickle.dumps(g))
    np.testing.assert_array_equal(g2[10**9 - 1]["tokens"], last)
    np.testing.assert_array_equal(g2[123]["tokens"], g[123]["tokens"])
