"""GPT dataset: fixed-length samples cut from a shuffled stream of documents (Megatron-LM's indices).

For a split holding documents D (sequence indices of an :class:`IndexedDataset`) and a requested
number of samples N:

* epochs E = smallest E with ``(E * tokens(D) - 1) // seq_length >= N``;
* ``doc_idx`` (int32): D tiled E times and shuffled with ``numpy.random.RandomState(seed)``; when
  E > 1 and the last epoch adds fewer than 80% of an epoch's samples, the first E-1 epochs and the
  last epoch are shuffled separately (so the partial epoch does not favour some documents);
* ``sample_idx`` (int32 [M + 1, 2]): C++ ``build_sample_idx``; sample k spans tokens
  ``[k * seq, k * seq + seq]`` (seq + 1 tokens) of the documents concatenated in ``doc_idx`` order;
* ``shuffle_idx``: a permutation of the M samples from the same RandomState (the samples of the
  separate last epoch are shuffled among themselves, after the others).

The three arrays are cached as .npy under ``path_to_cache`` (default ``<data dir>/index-cache``),
keyed by an MD5 of every parameter that changes them; one rank builds, the others wait, all mmap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from megatron.core.datasets import helpers
from megatron.core.datasets.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "megatron-tp-gpt-indices-v1"


@dataclass
class GPTDatasetConfig:
    """Everything that defines the GPT datasets; built once by the training code from its flags.

    Attributes:
        random_seed: ``--seed``; seeds the document and sample shuffles.
        sequence_length: ``--seq-length``.
        blend: ``(prefixes, weights or None)`` from ``--data-path`` (see ``get_blend_from_list``); the
            split string divides each prefix's documents into train/valid/test.
        blend_per_split: ``[train, valid, test]`` blends from ``--{train,valid,test}-data-path``
            (each entry ``(prefixes, weights or None)`` or None); overrides ``blend``/``split``.
        split: ``--split``, e.g. ``"949,50,1"``.
        train_valid_test_num_samples: samples wanted per split (None: one epoch of that split).
        path_to_cache: ``--data-cache-path``; default ``<dir of first prefix>/index-cache``.
        eod_id: the tokenizer's end-of-document id (needed by the three flags below).
        eod_mask_loss, reset_position_ids, reset_attention_mask: as Megatron's flags.
    """

    random_seed: int
    sequence_length: int
    blend: Optional[Tuple[List[str], Optional[List[float]]]] = None
    blend_per_split: Optional[List[Optional[Tuple[List[str], Optional[List[float]]]]]] = None
    split: Optional[str] = "969,30,1"
    train_valid_test_num_samples: Sequence[Optional[int]] = field(default_factory=lambda: [None, None, None])
    path_to_cache: Optional[str] = None
    eod_id: Optional[int] = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    def __post_init__(self):
        if self.sequence_length < 2:
            raise ValueError(f"--seq-length must be >= 2, got {self.sequence_length}")
        if self.blend is None and not self.blend_per_split:
            raise ValueError("no data: give --data-path or --train-data-path/--valid-data-path/--test-data-path")
        if self.blend_per_split is not None and len(self.blend_per_split) != 3:
            raise ValueError("blend_per_split must have 3 entries (train, valid, test)")
        if len(self.train_valid_test_num_samples) != 3:
            raise ValueError("train_valid_test_num_samples must have 3 entries (train, valid, test)")
        if (self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask) and self.eod_id is None:
            raise ValueError("--eod-mask-loss/--reset-position-ids/--reset-attention-mask need the tokenizer's "
                             "eod id (GPTDatasetConfig.eod_id)")


def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod_token: Optional[int], reset_position_ids: bool,
                                    reset_attention_mask: bool, eod_mask_loss: bool,
                                    create_attention_mask: bool):
    """Left-to-right masks for one sample ``tokens`` [s] (Megatron-LM's rules).

    Returns ``(attention_mask, loss_mask, position_ids)``: attention_mask bool [1, s, s] with True where
    attention is NOT allowed (causal, and across documents when ``reset_attention_mask``) or None;
    loss_mask float32 [s] (0 at EOD tokens when ``eod_mask_loss``); position_ids int64 [s] (restarting
    after each EOD when ``reset_position_ids``).
    """
    seq_length = tokens.numel()
    attention_mask = None
    if create_attention_mask:
        attention_mask = torch.tril(torch.ones((seq_length, seq_length))).unsqueeze(0)  # [1, s, s]
    loss_mask = torch.ones(seq_length, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(seq_length, dtype=torch.int64)
    if reset_position_ids or reset_attention_mask:
        eod_index = torch.nonzero(tokens == eod_token).flatten().tolist()
        prev_index = 0
        for i in eod_index:
            if reset_attention_mask and attention_mask is not None:
                attention_mask[0, i + 1:, :i + 1] = 0
            if reset_position_ids:
                position_ids[i + 1:] -= i + 1 - prev_index
                prev_index = i + 1
    if attention_mask is not None:
        attention_mask = attention_mask < 0.5
    return attention_mask, loss_mask, position_ids


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E with ``(E * tokens_per_epoch - 1) // seq_length >= num_samples``."""
    num_epochs = 1
    while (num_epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        num_epochs += 1
    return num_epochs


def build_doc_idx(documents: numpy.ndarray, num_epochs: int, np_rng: numpy.random.RandomState,
                  separate_last_epoch: bool) -> numpy.ndarray:
    """``documents`` tiled ``num_epochs`` times and shuffled (last epoch separately if asked)."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = numpy.tile(numpy.asarray(documents, dtype=numpy.int32), num_epochs)
        np_rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, np_rng, False)
    last = build_doc_idx(documents, 1, np_rng, False)
    return numpy.concatenate((first, last))


def build_shuffle_idx(num_samples: int, total_size: int, np_rng: numpy.random.RandomState) -> numpy.ndarray:
    """Permutation of ``[0, num_samples)`` followed by a separate permutation of ``[num_samples, total_size)``."""
    dtype = numpy.uint32 if total_size < numpy.iinfo(numpy.uint32).max - 1 else numpy.int64
    first = numpy.arange(num_samples, dtype=dtype)
    np_rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = numpy.arange(num_samples, total_size, dtype=dtype)
    np_rng.shuffle(last)
    return numpy.concatenate((first, last))


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), True
    return 0, False


def _all_ok(ok: bool) -> bool:
    """True on every rank iff every rank passed ``ok`` (a barrier that also carries failure)."""
    if not _dist_info()[1]:
        return ok
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) == 0


def _save_npy(path: str, array: numpy.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.npy"
    with open(tmp, "wb") as f:
        numpy.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``sequence_length`` tokens (+1 for labels) from documents ``indexed_indices``.

    Args:
        indexed_dataset: the tokenized corpus.
        dataset_path: its path prefix (part of the cache key).
        indexed_indices: int32 sequence indices of this split's documents.
        num_samples: samples wanted (None: one epoch). ``len(self)`` may be larger (whole epochs).
        index_split: ``"train"``, ``"valid"`` or ``"test"`` (part of the cache key).
        config: the :class:`GPTDatasetConfig`.
    """

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: str, indexed_indices: numpy.ndarray,
                 num_samples: Optional[int], index_split: str, config: GPTDatasetConfig):
        self.dataset = indexed_dataset
        self.dataset_path = dataset_path
        self.indices = numpy.asarray(indexed_indices, dtype=numpy.int32)
        self.index_split = index_split
        self.config = config
        self.tokens_per_epoch = int(indexed_dataset.sequence_lengths[self.indices].sum(dtype=numpy.int64))
        # A split shorter than one sample is fine (Megatron tiles it over many epochs); the sample index only
        # needs two tokens (one input, one label) to make progress.
        if self.tokens_per_epoch < 2:
            raise ValueError(f"{index_split} split of {dataset_path} holds {self.tokens_per_epoch} token(s) in "
                             f"{len(self.indices)} document(s), need at least 2; give it more documents with "
                             "--split (or set its weight to 0) or use more data")
        if num_samples is None:
            num_samples = (self.tokens_per_epoch - 1) // config.sequence_length
        self.num_samples = int(num_samples)
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, config.sequence_length, self.num_samples)
        self.description = self._description()
        self.unique_description_hash = hashlib.md5(self.description.encode("utf-8")).hexdigest()
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._build_or_load_indices()

    def _description(self) -> str:
        ds = self.dataset
        return json.dumps({
            "format": _CACHE_FORMAT, "class": "GPTDataset", "dataset_path": os.path.abspath(self.dataset_path),
            "num_sequences": len(ds), "num_tokens": int(ds.sequence_lengths.sum(dtype=numpy.int64)),
            "index_split": self.index_split, "split": self.config.split,
            "indices_first_last_count": [int(self.indices[0]), int(self.indices[-1]), len(self.indices)]
            if len(self.indices) else [],
            "num_samples": self.num_samples, "sequence_length": self.config.sequence_length,
            "random_seed": self.config.random_seed,
        }, indent=1, sort_keys=True)

    def _cache_paths(self) -> Tuple[str, Dict[str, str]]:
        cache = self.config.path_to_cache or os.path.join(
            os.path.dirname(os.path.abspath(self.dataset_path)), "index-cache")
        base = os.path.join(cache, f"{self.unique_description_hash}-GPTDataset-{self.index_split}")
        return cache, {k: f"{base}-{k}_index.npy" for k in ("document", "sample", "shuffle")}

    def _build_indices(self):
        seq, tpe, n = self.config.sequence_length, self.tokens_per_epoch, self.num_samples
        np_rng = numpy.random.RandomState(self.config.random_seed)
        separate_last_epoch = False
        num_samples_from_epochs_minus_one = 0
        if self.num_epochs > 1:
            num_samples_from_epochs_minus_one = ((self.num_epochs - 1) * tpe - 1) // seq
            last_epoch_num_samples = n - num_samples_from_epochs_minus_one
            num_samples_per_epoch = (tpe - 1) // seq
            assert 0 <= last_epoch_num_samples <= num_samples_per_epoch + 1
            separate_last_epoch = last_epoch_num_samples < int(0.80 * num_samples_per_epoch)
        doc_idx = build_doc_idx(self.indices, self.num_epochs, np_rng, separate_last_epoch)
        sample_idx = helpers.build_sample_idx(self.dataset.sequence_lengths, doc_idx, seq, self.num_epochs, tpe)
        total = sample_idx.shape[0] - 1
        shuffle_idx = build_shuffle_idx(num_samples_from_epochs_minus_one if separate_last_epoch else total,
                                        total, np_rng)
        return doc_idx, sample_idx, shuffle_idx

    def _build_or_load_indices(self):
        cache_dir, paths = self._cache_paths()
        rank, distributed = _dist_info()
        cached = all(os.path.isfile(p) for p in paths.values())
        if not _all_ok(cached or _can_write(cache_dir)):  # collective: every rank takes the same path
            logger.warning("index cache %s is not writable; building GPT indices in memory on every rank "
                           "(set --data-cache-path to a writable directory to cache them)", cache_dir)
            return self._build_indices()
        error = None
        if rank == 0 and not cached:
            try:
                start = time.time()
                arrays = self._build_indices()
                for key, arr in zip(("document", "sample", "shuffle"), arrays):
                    _save_npy(paths[key], arr)
                with open(paths["document"].replace("-document_index.npy", "-description.txt"), "w") as f:
                    f.write(self.description)
                logger.info("built GPT %s indices for %s in %.2f s: %d samples, %d epochs", self.index_split,
                            self.dataset_path, time.time() - start, len(arrays[2]), self.num_epochs)
            except Exception as e:  # let the other ranks fail too instead of hanging
                error = e
        if not _all_ok(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed to build the GPT indices in {cache_dir} (see rank 0's error)")
        return tuple(numpy.load(paths[k], mmap_mode="r", allow_pickle=False)
                     for k in ("document", "sample", "shuffle"))

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def query_sample(self, idx: int) -> numpy.ndarray:
        """The ``sequence_length + 1`` tokens of (shuffled) sample ``idx`` as int64."""
        if not 0 <= idx < len(self):
            raise IndexError(f"GPTDataset index {idx} out of range [0, {len(self)})")
        idx = int(self.shuffle_idx[idx])
        doc_f, offset_f = (int(x) for x in self.sample_idx[idx])
        doc_l, offset_l = (int(x) for x in self.sample_idx[idx + 1])
        if doc_f == doc_l:
            parts = [self.dataset.get(int(self.doc_idx[doc_f]), offset=offset_f, length=offset_l - offset_f + 1)]
        else:
            parts = [self.dataset.get(int(self.doc_idx[doc_f]), offset=offset_f)]
            parts += [self.dataset.get(int(self.doc_idx[i])) for i in range(doc_f + 1, doc_l)]
            parts.append(self.dataset.get(int(self.doc_idx[doc_l]), length=offset_l + 1))
        return numpy.concatenate(parts).astype(numpy.int64)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        text = torch.from_numpy(self.query_sample(int(idx)))  # [s + 1]
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()  # [s], [s]
        cfg = self.config
        attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
            tokens, cfg.eod_id, cfg.reset_position_ids, cfg.reset_attention_mask, cfg.eod_mask_loss,
            create_attention_mask=cfg.reset_attention_mask)
        item = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if attention_mask is not None:
            item["attention_mask"] = attention_mask  # [1, s, s], True = masked out
        return item


def _can_write(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def build_gpt_datasets(config: GPTDatasetConfig):
    """``(train, valid, test)`` datasets (each may be None); see :mod:`megatron.core.datasets.builder`."""
    from megatron.core.datasets.builder import build_gpt_datasets as _build

    return _build(config)
