"""DistributedDataParallelConfig: how data-parallel gradients are accumulated and reduced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DistributedDataParallelConfig:
    """Data-parallel gradient reduction settings (megatron-core names).

    Attributes:
        grad_reduce_in_fp32: keep ``main_grad`` buffers and the all-reduce in fp32 even for fp16/bf16
            params (``--accumulate-allreduce-grads-in-fp32``).
        overlap_grad_reduce: launch each bucket's all-reduce asynchronously as soon as all of its
            grads are ready in the last micro-batch's backward (``--overlap-grad-reduce``).
            Micro-batches before the last must run under ``DistributedDataParallel.no_sync()``.
        use_distributed_optimizer: accepted for flag compatibility; must be False (not implemented).
        check_for_nan_in_grad: raise before reducing if a local grad buffer holds inf/nan
            (leave off with fp16 loss scaling, where overflow is expected and skipped).
        bucket_size: elements per bucket when overlapping; None = max(40M, 1M * dp size).
            Without overlap all grads of a dtype form one bucket.
        average_in_collective: average with ReduceOp.AVG inside the all-reduce instead of scaling
            the grads by 1/dp before a SUM.
    """

    grad_reduce_in_fp32: bool = False
    overlap_grad_reduce: bool = False
    use_distributed_optimizer: bool = False
    check_for_nan_in_grad: bool = False
    bucket_size: Optional[int] = None
    average_in_collective: bool = False

    def __post_init__(self):
        if self.use_distributed_optimizer:
            raise ValueError("--use-distributed-optimizer is not implemented yet; drop the flag")
        if self.bucket_size is not None and self.bucket_size <= 0:
            raise ValueError(f"--ddp-bucket-size must be > 0 (got {self.bucket_size})")
