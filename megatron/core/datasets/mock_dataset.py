"""A deterministic, learnable synthetic GPT dataset for smoke tests and ``--mock-data``.

Every sample is a window of ``seq_length + 1`` tokens cut from an infinite periodic sequence: a
fixed random base sequence of period ``period`` (drawn from ``seed``) repeated forever. The window
start depends only on the sample index, so the data is deterministic, and because the sequence is
periodic the next token is predictable from the context: a model trained on it drives the loss
well below ``ln(vocab_size)``.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy
import torch


class MockGPTDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items match :class:`~megatron.core.datasets.gpt_dataset.GPTDataset`.

    Args:
        num_samples: number of samples (``len(dataset)``).
        seq_length: tokens per sample.
        vocab_size: token ids are drawn from ``[0, vocab_size)``.
        seed: seed of the base sequence.
        period: period of the base sequence (default 64).

    Items are dicts: ``tokens`` int64 [s], ``labels`` int64 [s] (tokens shifted by one),
    ``loss_mask`` float32 [s] (all ones), ``position_ids`` int64 [s] (0..s-1).
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234,
                 period: int = 64):
        if num_samples < 0 or seq_length < 1 or vocab_size < 2 or period < 1:
            raise ValueError(
                f"MockGPTDataset: need num_samples >= 0, seq_length >= 1, vocab_size >= 2, period >= 1 "
                f"(got {num_samples}, {seq_length}, {vocab_size}, {period})")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.period = period
        rng = numpy.random.RandomState(seed)
        self._base = rng.randint(0, vocab_size, size=period).astype(numpy.int64)  # [P]
        # Multiplier of the index -> offset map, coprime with the period so offsets cover all residues.
        stride = int(rng.randint(1, period + 1))
        while math.gcd(stride, period) != 1:
            stride += 1
        self._stride = stride
        self._position_ids = torch.arange(seq_length, dtype=torch.int64)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        idx = int(idx)
        if idx < 0:
            idx += self.num_samples
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"MockGPTDataset index {idx} out of range [0, {self.num_samples})")
        offset = (idx * self._stride) % self.period
        positions = (offset + numpy.arange(self.seq_length + 1)) % self.period
        window = torch.from_numpy(self._base[positions])  # [s + 1]
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": self._position_ids.clone(),
        }
