"""Indexed dataset: write/read equality, document boundaries, dtypes, corruption, merging."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from megads.data.indexed import (IndexedDataset, IndexedDatasetBuilder, best_dtype, exists,
                                 merge_datasets)
from megads.errors import DataError


def random_docs(n: int, high: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, high, size=rng.randint(0, 50)) for _ in range(n)]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65535), (np.int32, 200_000)])
def test_write_read_equality(tmp_path, dtype, high):
    docs = random_docs(40, high)
    prefix = tmp_path / "ds"
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == 40 and ds.num_docs == 40
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert list(ds.sizes) == [len(d) for d in docs]
    assert list(ds.doc_idx) == list(range(41))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document(i), d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(3, 2, 5), docs[3][2:7])
    np.testing.assert_array_equal(ds.get(3, 1), docs[3][1:])
    with pytest.raises(IndexError):
        ds[40]
    # pickles by prefix (DataLoader workers)
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[5], docs[5])


def test_multi_sequence_documents(tmp_path):
    prefix = tmp_path / "ds"
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_item([1, 2, 3])
    b.add_item([4])
    b.end_document()
    b.add_document([5, 6])
    b.add_item([7])
    b.add_item([])
    b.add_item([8, 9])
    b.end_document()
    b.finalize()
    ds = IndexedDataset(prefix)
    assert len(ds) == 6 and ds.num_docs == 3
    assert list(ds.doc_idx) == [0, 2, 3, 6]
    assert ds.document(0).tolist() == [1, 2, 3, 4]
    assert ds.document(2).tolist() == [7, 8, 9]
    assert ds.doc_sequences([2, 0]).tolist() == [3, 4, 5, 0, 1]


def test_dtype_choice_and_range_check(tmp_path):
    assert best_dtype(4096) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(129280) == np.int32
    b = IndexedDatasetBuilder(tmp_path / "x", np.uint16)
    with pytest.raises(DataError, match="out of range"):
        b.add_document([1, 70000])
    b.abort()
    assert not exists(tmp_path / "x") and os.listdir(tmp_path) == []


def test_finalize_is_atomic(tmp_path):
    prefix = tmp_path / "ds"
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2])
    before = (tmp_path / "ds.bin").read_bytes(), (tmp_path / "ds.idx").read_bytes()
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document([3, 4, 5])
            raise RuntimeError("interrupted")
    # the old dataset is untouched and no temporary files are left
    assert ((tmp_path / "ds.bin").read_bytes(), (tmp_path / "ds.idx").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


@pytest.fixture
def small_ds(tmp_path):
    prefix = tmp_path / "ds"
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in random_docs(10, 500):
            b.add_document(d)
    return prefix


def test_bad_magic(small_ds):
    idx = f"{small_ds}.idx"
    data = bytearray(open(idx, "rb").read())
    data[:4] = b"JUNK"
    open(idx, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"ds\.idx.*bad magic"):
        IndexedDataset(small_ds)


def test_truncated_index(small_ds):
    idx = f"{small_ds}.idx"
    data = open(idx, "rb").read()
    open(idx, "wb").write(data[:-5])
    with pytest.raises(DataError, match=r"ds\.idx.*truncated"):
        IndexedDataset(small_ds)
    open(idx, "wb").write(data[:12])  # shorter than the header
    with pytest.raises(DataError, match=r"ds\.idx"):
        IndexedDataset(small_ds)


def test_truncated_data(small_ds):
    bin_ = f"{small_ds}.bin"
    data = open(bin_, "rb").read()
    open(bin_, "wb").write(data[:-2])
    with pytest.raises(DataError, match=r"ds\.bin.*truncated"):
        IndexedDataset(small_ds)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx.*not found"):
        IndexedDataset(tmp_path / "nope")


def test_merge(tmp_path):
    a, b = random_docs(7, 300, seed=1), random_docs(5, 100_000, seed=2)
    with IndexedDatasetBuilder(tmp_path / "a", np.uint16) as w:
        for d in a:
            w.add_document(d)
    with IndexedDatasetBuilder(tmp_path / "b", np.int32) as w:
        for d in b:
            w.add_document(d)
    m = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "m")
    assert m.dtype == np.int32 and m.num_docs == 12 and len(m) == 12
    for i, d in enumerate(a + b):
        np.testing.assert_array_equal(m.document(i), d)
    with pytest.raises(DataError, match="do not fit"):
        merge_datasets([str(tmp_path / "b")], tmp_path / "m16", dtype=np.uint16)
