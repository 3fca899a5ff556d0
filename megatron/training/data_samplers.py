"""Batch samplers and the pretraining data loader (Megatron-LM semantics).

Samples are consumed in one global order ``0, 1, 2, ...`` (the dataset itself holds the shuffle).
Each global step of ``micro_batch_size * data_parallel_size`` consecutive indices is split so that
data-parallel rank ``r`` takes the slice ``[r * mbs, (r + 1) * mbs)``. Iteration starts exactly at
``consumed_samples``, so a resumed run continues the data order where the checkpoint left it.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch


class MegatronPretrainingSampler:
    """Sequential batch sampler: yields this DP rank's micro-batch of indices per global step.

    Args:
        total_samples: number of samples in the dataset.
        consumed_samples: samples already consumed by all ranks together (resume point).
        micro_batch_size: samples per rank per micro-batch.
        data_parallel_rank: this rank's index in the data-parallel group.
        data_parallel_size: size of the data-parallel group.
        drop_last: drop a final incomplete ``mbs * dp`` chunk (default, as Megatron).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: dataset has {total_samples} samples")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} must be in [0, {total_samples}) "
                             "(the dataset is exhausted; build it with more --train-samples/--train-iters)")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} must be in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def get_start_end_idx(self):
        start_idx = self.data_parallel_rank * self.micro_batch_size
        return start_idx, start_idx + self.micro_batch_size

    def __iter__(self) -> Iterator[List[int]]:
        batch: List[int] = []
        start, end = self.get_start_end_idx()
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.micro_batch_times_data_parallel_size:
                yield batch[start:end]
                batch = []
        if batch and not self.drop_last:
            tail = batch[start:end]
            if tail:
                yield tail


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int,
                                  num_workers: int = 0) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader over ``dataset`` that yields this DP rank's micro-batches from ``consumed_samples`` on.

    Returns None when ``dataset`` is None (e.g. no validation split). Batches are dicts of stacked
    tensors (``tokens`` [b, s], ``labels`` [b, s], ``loss_mask`` [b, s], ``position_ids`` [b, s]).
    """
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset), consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size, data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
