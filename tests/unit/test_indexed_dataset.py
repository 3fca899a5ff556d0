"""Indexed dataset .bin/.idx: a hand-built writer (DESIGN.md byte layout) vs our builder and reader."""

import os
import pickle
import struct

import numpy
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_fitting_dtype

CODES = {numpy.uint8: 1, numpy.int8: 2, numpy.int16: 3, numpy.int32: 4, numpy.int64: 5,
         numpy.float64: 6, numpy.float32: 7, numpy.uint16: 8}


def hand_write(prefix, docs, dtype):
    """docs: list of documents, each a list of sequences (lists of ids). Written byte by byte per DESIGN.md."""
    seqs = [s for d in docs for s in d]
    item = numpy.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            for t in s:
                f.write(numpy.array([t], dtype=dtype).tobytes())
    doc_idx, n = [0], 0
    for d in docs:
        n += len(d)
        doc_idx.append(n)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(seqs)))
        f.write(struct.pack("<Q", len(doc_idx)))
        for s in seqs:
            f.write(struct.pack("<i", len(s)))
        ptr = 0
        for s in seqs:
            f.write(struct.pack("<q", ptr))
            ptr += len(s) * item
        for x in doc_idx:
            f.write(struct.pack("<q", x))


def random_docs(rng, high, n_docs=25):
    docs = []
    for _ in range(n_docs):
        n_seqs = int(rng.integers(1, 4))
        docs.append([list(rng.integers(0, high, size=int(rng.integers(0, 30)))) for _ in range(n_seqs)])
    return docs


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32, numpy.int64, numpy.uint8])
def test_builder_byte_identical_and_reader(tmp_path, dtype):
    rng = numpy.random.default_rng(0)
    high = min(numpy.iinfo(dtype).max, 70000)
    docs = random_docs(rng, high)
    hand_write(str(tmp_path / "hand"), docs, dtype)
    ours = str(tmp_path / "ours")
    b = IndexedDatasetBuilder(ours + ".bin", dtype=dtype)
    for i, d in enumerate(docs):
        if i % 2:  # older Megatron API: add_item per sequence, end_document
            for s in d:
                b.add_item(torch.tensor(s, dtype=torch.int64))
            b.end_document()
        else:
            b.add_document([t for s in d for t in s], [len(s) for s in d])
    assert not os.path.exists(ours + ".bin")  # temp names until finalize
    b.finalize(ours + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(str(tmp_path / "hand") + ext, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["hand.bin", "hand.idx", "ours.bin", "ours.idx"]

    ds = IndexedDataset(str(tmp_path / "hand"))
    seqs = [s for d in docs for s in d]
    assert len(ds) == len(seqs) and ds.dtype == dtype
    for i, s in enumerate(seqs):
        numpy.testing.assert_array_equal(ds[i], numpy.array(s, dtype=dtype))
    assert list(ds.sequence_lengths) == [len(s) for s in seqs]
    assert list(ds.document_indices) == [0] + list(numpy.cumsum([len(d) for d in docs]))
    j = max(range(len(seqs)), key=lambda k: len(seqs[k]))
    numpy.testing.assert_array_equal(ds.get(j, offset=2, length=3), numpy.array(seqs[j][2:5], dtype=dtype))
    ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers re-open by path
    numpy.testing.assert_array_equal(ds2[j], ds[j])


def test_best_fitting_dtype():
    assert best_fitting_dtype(50257) == numpy.uint16
    assert best_fitting_dtype(65499) == numpy.uint16
    assert best_fitting_dtype(65500) == numpy.int32
    assert best_fitting_dtype(None) == numpy.int32


def test_builder_rejects_ids_that_do_not_fit(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=numpy.uint16) as b:
        with pytest.raises(ValueError, match="do not fit"):
            b.add_item([1, 70000])
        b.abort()
    assert os.listdir(tmp_path) == []


def test_reader_rejects_bad_files(tmp_path):
    p = str(tmp_path / "d")
    hand_write(p, [[[1, 2, 3]], [[4, 5], [6]]], numpy.int32)
    idx, binf = open(p + ".idx", "rb").read(), open(p + ".bin", "rb").read()

    def expect(idx_bytes, bin_bytes, match):
        open(p + ".idx", "wb").write(idx_bytes)
        open(p + ".bin", "wb").write(bin_bytes)
        with pytest.raises(ValueError, match=match):
            IndexedDataset(p)

    expect(b"GARBAGE!" + idx[8:], binf, "bad magic")
    expect(idx[:20], binf, "bad magic or truncated")
    expect(idx[:-4], binf, "truncated or corrupt")
    expect(idx[:9] + struct.pack("<Q", 2) + idx[17:], binf, "version 2")
    expect(idx[:17] + b"\x09" + idx[18:], binf, "dtype code 9")
    expect(idx, binf[:-4], "truncated or mismatched")
    expect(idx, binf + b"\x00" * 4, "truncated or mismatched")
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        IndexedDataset(str(tmp_path / "missing"))
