"""Loader for the C++ dataset helpers, with the numpy reference as a fallback.

``build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)`` and
``build_blending_indices(dataset_index, dataset_sample_index, weights, num_datasets, size, verbose)``
have Megatron-LM's semantics (see ``csrc/helpers.cpp``). ``HAVE_CPP_HELPERS`` says which is in use.
"""

from __future__ import annotations

import logging

import numpy
import torch  # noqa: F401  (import torch before any compiled extension, as the rest of the package does)

from megatron.core.datasets import helpers_ref

logger = logging.getLogger(__name__)

try:
    from megatron.core.datasets import helpers_cpp as _impl

    HAVE_CPP_HELPERS = True
except ImportError:  # not built: `pip install --no-build-isolation -e .` builds it from csrc/helpers.cpp
    _impl = helpers_ref
    HAVE_CPP_HELPERS = False
    logger.warning("megatron.core.datasets.helpers_cpp is not built; using the (slower) numpy reference. "
                   "Build it with `pip install --no-build-isolation -e .`")


def build_sample_idx(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int) -> numpy.ndarray:
    """``int32[num_samples + 1, 2]``: rows of (position in ``doc_idx``, token offset) where samples start."""
    return _impl.build_sample_idx(numpy.ascontiguousarray(sizes, dtype=numpy.int32),
                                  numpy.ascontiguousarray(doc_idx, dtype=numpy.int32),
                                  int(seq_length), int(num_epochs), int(tokens_per_epoch))


def build_blending_indices(dataset_index: numpy.ndarray, dataset_sample_index: numpy.ndarray, weights,
                           num_datasets: int, size: int, verbose: bool = False) -> None:
    """Fill ``dataset_index`` (uint8 [size]) and ``dataset_sample_index`` (int64 [size]) in place."""
    if dataset_index.dtype != numpy.uint8 or dataset_sample_index.dtype != numpy.int64:
        raise TypeError("build_blending_indices: dataset_index must be uint8 and dataset_sample_index int64")
    _impl.build_blending_indices(dataset_index, dataset_sample_index,
                                 numpy.ascontiguousarray(weights, dtype=numpy.float64),
                                 int(num_datasets), int(size), bool(verbose))
    if verbose:
        counts = numpy.bincount(dataset_index[:size], minlength=num_datasets)
        for d in range(num_datasets):
            logger.info("blended dataset %d: weight %.6f, achieved %.6f (%d samples)",
                        d, weights[d], counts[d] / max(size, 1), counts[d])
