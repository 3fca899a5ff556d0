"""C++ dataset helpers (csrc/helpers.cpp) equal the numpy references exactly on random inputs."""

import numpy
import pytest

from megatron.core.datasets import helpers, helpers_ref

helpers_cpp = pytest.importorskip("megatron.core.datasets.helpers_cpp",
                                  reason="C++ helpers not built (pip install --no-build-isolation -e .)")


def _random_case(rng):
    num_docs = int(rng.integers(1, 60))
    sizes = rng.integers(0, 50, size=num_docs).astype(numpy.int32)
    if rng.random() < 0.3:
        sizes[rng.integers(0, num_docs, size=num_docs // 3)] = 0  # empty documents
    sizes[rng.integers(0, num_docs)] = max(2, int(sizes.max()))  # at least 2 tokens overall
    num_epochs = int(rng.integers(1, 5))
    doc_idx = numpy.concatenate([rng.permutation(num_docs) for _ in range(num_epochs)]).astype(numpy.int32)
    seq_length = int(rng.integers(2, 40))
    return sizes, doc_idx, seq_length, num_epochs, int(sizes.sum())


def test_build_sample_idx_matches_reference_random():
    rng = numpy.random.default_rng(0)
    for _ in range(300):
        sizes, doc_idx, seq_length, num_epochs, tpe = _random_case(rng)
        if tpe <= 1:
            continue
        got = helpers_cpp.build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tpe)
        want = helpers_ref.build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tpe)
        assert got.dtype == numpy.int32 and got.shape == want.shape == ((num_epochs * tpe - 1) // seq_length + 1, 2)
        numpy.testing.assert_array_equal(got, want)


def test_build_sample_idx_samples_cover_stream():
    """Reading seq+1 tokens at each (doc position, offset) reproduces windows of the concatenated stream."""
    rng = numpy.random.default_rng(1)
    sizes, doc_idx, seq_length, num_epochs, tpe = _random_case(rng)
    docs = [rng.integers(0, 1000, size=s) for s in sizes]
    stream = numpy.concatenate([docs[d] for d in doc_idx])
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tpe)
    for k in range(len(sample_idx) - 1):
        (p0, o0), (p1, o1) = sample_idx[k], sample_idx[k + 1]
        parts = [docs[doc_idx[p0]][o0:]] if p0 != p1 else [docs[doc_idx[p0]][o0:o1 + 1]]
        if p0 != p1:
            parts += [docs[doc_idx[p]] for p in range(p0 + 1, p1)] + [docs[doc_idx[p1]][:o1 + 1]]
        numpy.testing.assert_array_equal(numpy.concatenate(parts), stream[k * seq_length:(k + 1) * seq_length + 1])


def test_build_sample_idx_rejects_short_input():
    sizes = numpy.array([5, 5], dtype=numpy.int32)
    doc_idx = numpy.array([0, 1], dtype=numpy.int32)
    for impl in (helpers_cpp, helpers_ref):
        with pytest.raises(ValueError, match="fewer tokens"):
            impl.build_sample_idx(sizes, doc_idx, 4, 2, 10)  # claims 2 epochs, doc_idx holds 1


def test_build_blending_indices_matches_reference_random():
    rng = numpy.random.default_rng(2)
    for _ in range(60):
        n = int(rng.integers(1, 12))
        weights = rng.random(n) + 1e-3
        weights /= weights.sum()
        size = int(rng.integers(0, 3000))
        got_d, got_s = numpy.zeros(size, numpy.uint8), numpy.zeros(size, numpy.int64)
        want_d, want_s = numpy.zeros(size, numpy.uint8), numpy.zeros(size, numpy.int64)
        helpers_cpp.build_blending_indices(got_d, got_s, weights, n, size, False)
        helpers_ref.build_blending_indices(want_d, want_s, weights, n, size, False)
        numpy.testing.assert_array_equal(got_d, want_d)
        numpy.testing.assert_array_equal(got_s, want_s)
        if size > 1000:  # the greedy rule tracks the weights closely
            numpy.testing.assert_allclose(numpy.bincount(got_d, minlength=n) / size, weights, atol=n / size + 1e-9)
        for d in range(n):  # each dataset's samples are taken in order 0, 1, 2, ...
            numpy.testing.assert_array_equal(got_s[got_d == d], numpy.arange((got_d == d).sum()))


def test_blending_equal_weights_ties_go_to_first():
    d, s = numpy.zeros(6, numpy.uint8), numpy.zeros(6, numpy.int64)
    helpers.build_blending_indices(d, s, numpy.array([0.5, 0.5]), 2, 6, verbose=True)
    ref_d, ref_s = numpy.zeros(6, numpy.uint8), numpy.zeros(6, numpy.int64)
    helpers_ref.build_blending_indices(ref_d, ref_s, numpy.array([0.5, 0.5]), 2, 6)
    numpy.testing.assert_array_equal(d, ref_d)
    assert helpers.HAVE_CPP_HELPERS
