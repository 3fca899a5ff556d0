"""Megatron-LM's mmap indexed dataset: ``{prefix}.bin`` (raw token ids) + ``{prefix}.idx`` (index).

``.idx`` layout (little-endian): ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code, ``<Q``
sequence count, ``<Q`` document count (documents + 1), int32[seq] sequence lengths, int64[seq] byte
pointers into ``.bin``, int64[docs + 1] document indices (sequence-index boundaries starting at 0).
Files are interchangeable with Megatron-LM's. The builder writes both files under temporary names
and renames them on :meth:`IndexedDatasetBuilder.finalize`, so a crash never leaves a partial
dataset under the final name.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Optional, Sequence, Type, Union

import numpy

logger = logging.getLogger(__name__)

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_SIZE = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype, seq count, doc count

DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
          6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}


def dtype_code(dtype) -> int:
    """The .idx code of a numpy dtype (1 uint8 ... 8 uint16)."""
    dtype = numpy.dtype(dtype).type
    for code, t in DTYPES.items():
        if t == dtype:
            return code
    raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset; use one of "
                     f"{[numpy.dtype(t).name for t in DTYPES.values()]}")


def best_fitting_dtype(vocab_size: Optional[int] = None) -> Type[numpy.number]:
    """uint16 when the vocab has fewer than 65500 ids, else int32 (Megatron-LM's rule)."""
    if vocab_size is not None and vocab_size < 65500:
        return numpy.uint16
    return numpy.int32


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _fsync_replace(tmp: str, final: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_index(idx_path: str, dtype, sequence_lengths, document_indices) -> None:
    """Write an .idx file for ``sequence_lengths`` (pointers derived from them) and ``document_indices``."""
    lengths = numpy.asarray(sequence_lengths, dtype=numpy.int32)
    itemsize = numpy.dtype(dtype).itemsize
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    if len(lengths) > 1:
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * itemsize, out=pointers[1:])
    doc_idx = numpy.asarray(document_indices, dtype=numpy.int64)
    with open(idx_path, "wb") as f:
        f.write(_INDEX_HEADER)
        f.write(struct.pack("<Q", _VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(doc_idx.astype("<i8").tobytes(order="C"))


class IndexedDatasetBuilder:
    """Streams token sequences into ``bin_path`` and writes the matching index on :meth:`finalize`.

    Args:
        bin_path: final path of the ``.bin`` file (written as a temporary file until finalize).
        dtype: token dtype (see :func:`best_fitting_dtype`).

    Use ``add_item`` per sequence and ``end_document`` per document (Megatron's older API), or
    ``add_document(tokens, lengths)`` for a whole document. As a context manager, an exception
    discards the temporary files.
    """

    def __init__(self, bin_path: str, dtype=numpy.int32):
        dtype_code(dtype)  # validate early
        self.bin_path = bin_path
        self.dtype = numpy.dtype(dtype)
        self._tmp_bin = f"{bin_path}.tmp.{os.getpid()}"
        self.data_file = open(self._tmp_bin, "wb")
        self.sequence_lengths = []
        self.document_indices = [0]

    def _write(self, tokens) -> int:
        if hasattr(tokens, "numpy"):  # torch tensor
            tokens = tokens.numpy()
        arr = numpy.asarray(tokens)
        if arr.size and arr.dtype.kind in "iu":
            info = numpy.iinfo(self.dtype) if self.dtype.kind in "iu" else None
            if info is not None and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"token ids in [{arr.min()}, {arr.max()}] do not fit dtype {self.dtype.name}; "
                                 "build with a wider dtype (best_fitting_dtype(vocab_size))")
        arr = numpy.ascontiguousarray(arr, dtype=self.dtype).reshape(-1)
        self.data_file.write(arr.tobytes(order="C"))
        return arr.size

    def add_item(self, tokens) -> None:
        """Append one sequence (tensor, array or list of ids)."""
        self.sequence_lengths.append(self._write(tokens))

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document made of sequences of ``lengths`` (default: one sequence) and end it."""
        n = self._write(tokens)
        lengths = [n] if lengths is None else [int(x) for x in lengths]
        if sum(lengths) != n:
            raise ValueError(f"add_document: lengths sum to {sum(lengths)} but the document has {n} tokens")
        self.sequence_lengths.extend(lengths)
        self.end_document()

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names (idx last)."""
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        self.data_file.close()
        tmp_idx = f"{idx_path}.tmp.{os.getpid()}"
        write_index(tmp_idx, self.dtype, self.sequence_lengths, self.document_indices)
        if os.path.exists(idx_path):
            os.remove(idx_path)  # never pair a new .bin with a stale .idx
        _fsync_replace(self._tmp_bin, self.bin_path)
        _fsync_replace(tmp_idx, idx_path)

    def abort(self) -> None:
        """Close and delete the temporary .bin (nothing appears under the final name)."""
        if not self.data_file.closed:
            self.data_file.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class IndexedDataset:
    """Read-only mmap view of ``{path_prefix}.bin/.idx``; ``ds[i]`` is sequence i as a numpy array.

    Raises ValueError with the file name on a foreign, truncated or inconsistent file.
    """

    def __init__(self, path_prefix: str, mmap: bool = True):
        self.path_prefix = path_prefix
        self._load(path_prefix)

    def _load(self, path_prefix: str) -> None:
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset file {p} not found (expected {path_prefix}.bin and "
                                        f"{path_prefix}.idx, e.g. from tools/preprocess_data.py)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[:9] != _INDEX_HEADER:
            raise ValueError(f"{idx_path}: not a Megatron indexed dataset index (bad magic or truncated header)")
        version, = struct.unpack("<Q", header[9:17])
        code, = struct.unpack("<B", header[17:18])
        seq_count, doc_count = struct.unpack("<QQ", header[18:34])
        if version != _VERSION:
            raise ValueError(f"{idx_path}: index version {version} is not supported (expected {_VERSION})")
        if code not in DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        expected = _HEADER_SIZE + seq_count * 12 + doc_count * 8
        if idx_size != expected:
            raise ValueError(f"{idx_path}: size {idx_size} bytes, expected {expected} for {seq_count} sequences "
                             f"and {doc_count} document indices (truncated or corrupt)")
        self.dtype = DTYPES[code]
        itemsize = numpy.dtype(self.dtype).itemsize
        self._idx_mmap = numpy.memmap(idx_path, mode="r", order="C")
        off = _HEADER_SIZE
        self.sequence_lengths = numpy.frombuffer(self._idx_mmap, dtype="<i4", count=seq_count, offset=off)
        off += seq_count * 4
        self.sequence_pointers = numpy.frombuffer(self._idx_mmap, dtype="<i8", count=seq_count, offset=off)
        off += seq_count * 8
        self.document_indices = numpy.frombuffer(self._idx_mmap, dtype="<i8", count=doc_count, offset=off)
        self._check(idx_path, bin_path, itemsize)
        bin_size = os.path.getsize(bin_path)
        self._bin_buffer = numpy.memmap(bin_path, mode="r", order="C") if bin_size else b""

    def _check(self, idx_path: str, bin_path: str, itemsize: int) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or numpy.any(numpy.diff(docs) < 0):
            raise ValueError(f"{idx_path}: document indices do not run from 0 to the sequence count")
        if len(lengths) and lengths.min() < 0:
            raise ValueError(f"{idx_path}: negative sequence length")
        total = int(lengths.sum(dtype=numpy.int64)) * itemsize
        ends = pointers + lengths.astype(numpy.int64) * itemsize
        if len(lengths) and (pointers[0] != 0 or numpy.any(pointers[1:] != ends[:-1])):
            raise ValueError(f"{idx_path}: sequence pointers do not match sequence lengths (corrupt index)")
        bin_size = os.path.getsize(bin_path)
        if bin_size != total:
            raise ValueError(f"{bin_path}: size {bin_size} bytes, but {idx_path} describes {total} bytes "
                             "(truncated or mismatched .bin/.idx pair)")

    def __getstate__(self):
        return self.path_prefix

    def __setstate__(self, path_prefix):
        self.path_prefix = path_prefix
        self._load(path_prefix)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (whole remainder if length is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"get({idx}, offset={offset}, length={length}) outside sequence of {size} tokens")
        ptr = int(self.sequence_pointers[idx]) + offset * numpy.dtype(self.dtype).itemsize
        return numpy.frombuffer(self._bin_buffer, dtype=self.dtype, count=length, offset=ptr)

    def __getitem__(self, idx: Union[int, slice]):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous")
            return [self.get(i) for i in range(start, stop)]
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence index {idx} out of range [0, {len(self)})")
        return self.get(idx)

    # Megatron-LM's older attribute names.
    @property
    def sizes(self) -> numpy.ndarray:
        return self.sequence_lengths

    @property
    def doc_idx(self) -> numpy.ndarray:
        return self.document_indices

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))


MMapIndexedDataset = IndexedDataset
MMapIndexedDatasetBuilder = IndexedDatasetBuilder
