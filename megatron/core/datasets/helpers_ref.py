"""Pure-numpy references for the C++ dataset helpers (``csrc/helpers.cpp``).

Written independently of the C++ loops: ``build_sample_idx`` is computed in closed form (sample k
starts at global token ``k * seq_length`` of the documents concatenated in ``doc_idx`` order), and
``build_blending_indices`` is the greedy rule written directly. Tests compare the C++ results
against these exactly; the loader falls back to them when the extension is not built.
"""

from __future__ import annotations

import numpy


def build_sample_idx(sizes: numpy.ndarray, doc_idx: numpy.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int) -> numpy.ndarray:
    """Sample index ``int32[num_samples + 1, 2]`` of (position in ``doc_idx``, offset in that document)."""
    if seq_length <= 1 or num_epochs <= 0 or tokens_per_epoch <= 1:
        raise ValueError("build_sample_idx: need seq_length > 1, num_epochs > 0, tokens_per_epoch > 1")
    num_samples = (int(num_epochs) * int(tokens_per_epoch) - 1) // int(seq_length)
    doc_lengths = numpy.asarray(sizes, dtype=numpy.int64)[numpy.asarray(doc_idx, dtype=numpy.int64)]
    doc_ends = numpy.cumsum(doc_lengths)  # exclusive end token of each doc_idx position
    starts = numpy.arange(1, num_samples + 1, dtype=numpy.int64) * int(seq_length)  # [N]
    # The last token of sample N is starts[-1] itself (shared with the would-be next sample).
    if num_samples > 0 and (len(doc_ends) == 0 or starts[-1] >= doc_ends[-1]):
        raise ValueError("build_sample_idx: documents hold fewer tokens than num_epochs * tokens_per_epoch")
    position = numpy.searchsorted(doc_ends, starts, side="right")  # doc_idx position holding that token
    doc_begin = numpy.concatenate([[0], doc_ends])[position]
    out = numpy.zeros((num_samples + 1, 2), dtype=numpy.int32)
    out[1:, 0] = position
    out[1:, 1] = starts - doc_begin
    return out


def build_blending_indices(dataset_index: numpy.ndarray, dataset_sample_index: numpy.ndarray,
                           weights: numpy.ndarray, num_datasets: int, size: int, verbose: bool = False) -> None:
    """Fill ``dataset_index[:size]`` (uint8) and ``dataset_sample_index[:size]`` (int64) in place.

    Sample i goes to the first dataset maximising ``weights[d] * max(i, 1) - taken[d]``.
    """
    weights = numpy.asarray(weights, dtype=numpy.float64)[:num_datasets]
    taken = numpy.zeros(num_datasets, dtype=numpy.int64)
    for i in range(size):
        error = weights * float(max(i, 1)) - taken.astype(numpy.float64)
        d = int(numpy.argmax(error))  # argmax returns the first maximum, as the strict '>' scan does
        dataset_index[i] = d
        dataset_sample_index[i] = taken[d]
        taken[d] += 1
