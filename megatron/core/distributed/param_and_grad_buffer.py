"""Contiguous gradient buffers split into buckets that are all-reduced over the data-parallel group.

Each param's ``main_grad`` is a view into one flat buffer per (param dtype, grad dtype). Params are
laid out in reverse registration order (roughly the order backward produces their grads), so with
``overlap_grad_reduce`` the first buckets fill up -- and their all-reduce starts -- while backward
is still computing the grads of earlier layers.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig

logger = logging.getLogger(__name__)


class Bucket:
    """A contiguous slice of a grad buffer reduced by one collective.

    Args:
        ddp_config: reduction settings.
        params: the params whose ``main_grad`` lives in this slice.
        grad_data: the slice itself (1-D view into the buffer).
        offset: start of the slice in the buffer (elements).
        data_parallel_group: group to all-reduce over.
        data_parallel_world_size: its size.
        gradient_scaling_factor: grads are multiplied by this before a SUM all-reduce (1/dp averages).
    """

    def __init__(self, ddp_config: DistributedDataParallelConfig, params: List[torch.nn.Parameter],
                 grad_data: torch.Tensor, offset: int, data_parallel_group, data_parallel_world_size: int,
                 gradient_scaling_factor: float):
        self.ddp_config = ddp_config
        self.params_list = params
        self.params = set(params)
        self.grad_data = grad_data  # [bucket numel]
        self.offset = offset
        self.data_parallel_group = data_parallel_group
        self.data_parallel_world_size = data_parallel_world_size
        self.gradient_scaling_factor = gradient_scaling_factor
        self.reset()

    def reset(self) -> None:
        """Forget which grads are ready and any pending collective (call once per global batch)."""
        self.params_with_grad = set()
        self.communication_handle = None
        self.communication_issued = False

    def start_grad_sync(self) -> None:
        """Average this bucket's grads over DP (asynchronously when overlapping)."""
        if self.communication_issued:
            raise RuntimeError("grad sync already issued for this bucket; call zero_grad_buffer() between "
                               "global batches")
        if self.ddp_config.check_for_nan_in_grad:
            norm = self.grad_data.float().norm(p=2)
            if not torch.isfinite(norm):
                rank = dist.get_rank() if dist.is_initialized() else 0
                raise RuntimeError(f"rank {rank}: found {norm.item()} in local grad norm before the "
                                   "data-parallel all-reduce (--check-for-nan-in-loss-and-grad)")
        if self.data_parallel_world_size > 1:
            if self.gradient_scaling_factor != 1.0:
                self.grad_data *= self.gradient_scaling_factor
            op = dist.ReduceOp.AVG if self.ddp_config.average_in_collective else dist.ReduceOp.SUM
            self.communication_handle = dist.all_reduce(self.grad_data, op=op, group=self.data_parallel_group,
                                                        async_op=self.ddp_config.overlap_grad_reduce)
        self.communication_issued = True

    def finish_grad_sync(self) -> None:
        """Make sure the reduction is done (issue it now if backward did not)."""
        if not self.communication_issued:
            self.start_grad_sync()
        if self.communication_handle is not None:
            self.communication_handle.wait()
            self.communication_handle = None

    def register_grad_ready(self, param: torch.nn.Parameter) -> None:
        """Mark ``param``'s grad as final; launch the all-reduce once every grad of the bucket is."""
        if param not in self.params:
            raise RuntimeError("param is not in this bucket")
        if param in self.params_with_grad:
            raise RuntimeError("a param's grad became ready twice in one backward with overlap_grad_reduce; "
                               "run earlier micro-batches under model.no_sync() or turn overlap off")
        self.params_with_grad.add(param)
        if len(self.params_with_grad) == len(self.params):
            self.start_grad_sync()


class ParamAndGradBuffer:
    """One flat grad buffer for params of one dtype, cut into :class:`Bucket` s.

    Sets ``param.main_grad`` (a view of shape ``param.shape``) for every param.

    Args:
        ddp_config: reduction settings.
        param_dtype: dtype of the params in this buffer.
        grad_dtype: dtype of the buffer (fp32 with ``grad_reduce_in_fp32``).
        params: the params, in registration order.
        data_parallel_group: group to all-reduce over.
        bucket_size: elements per bucket (a bucket closes after the param that reaches it); None = one bucket.
        gradient_scaling_factor: multiplier applied before a SUM all-reduce.
    """

    def __init__(self, ddp_config: DistributedDataParallelConfig, param_dtype: torch.dtype,
                 grad_dtype: torch.dtype, params: List[torch.nn.Parameter], data_parallel_group,
                 bucket_size: Optional[int], gradient_scaling_factor: float):
        self.ddp_config = ddp_config
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.data_parallel_group = data_parallel_group
        self.data_parallel_world_size = dist.get_world_size(group=data_parallel_group)
        self.is_last_microbatch = True
        ordered = list(reversed(params))
        total = sum(p.numel() for p in ordered)
        device = ordered[0].device
        self.grad_data = torch.zeros(total, dtype=grad_dtype, device=device)  # [numel of all params]

        self.buckets: List[Bucket] = []
        self.param_to_bucket: Dict[torch.nn.Parameter, Bucket] = {}
        self.param_index_map: Dict[torch.nn.Parameter, tuple] = {}
        offset, bucket_start, bucket_params = 0, 0, []
        for param in ordered:
            end = offset + param.numel()
            param.main_grad = self.grad_data[offset:end].view(param.shape)
            self.param_index_map[param] = (offset, end)
            bucket_params.append(param)
            offset = end
            if bucket_size is not None and offset - bucket_start >= bucket_size:
                self._add_bucket(bucket_params, bucket_start, offset, gradient_scaling_factor)
                bucket_start, bucket_params = offset, []
        if bucket_params:
            self._add_bucket(bucket_params, bucket_start, offset, gradient_scaling_factor)
        logger.debug("grad buffer %s/%s: %d params, %d elements, %d buckets", param_dtype, grad_dtype,
                     len(ordered), total, len(self.buckets))

    def _add_bucket(self, params, start: int, end: int, gradient_scaling_factor: float) -> None:
        bucket = Bucket(self.ddp_config, params, self.grad_data[start:end], start, self.data_parallel_group,
                        self.data_parallel_world_size, gradient_scaling_factor)
        self.buckets.append(bucket)
        for param in params:
            self.param_to_bucket[param] = bucket

    def reset(self) -> None:
        """Zero the grads and bucket state for a new global batch."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()
        self.is_last_microbatch = True

    def start_grad_sync(self) -> None:
        for bucket in self.buckets:
            bucket.start_grad_sync()

    def finish_grad_sync(self) -> None:
        for bucket in self.buckets:
            bucket.finish_grad_sync()

    def register_grad_ready(self, param: torch.nn.Parameter) -> None:
        if self.ddp_config.overlap_grad_reduce and self.is_last_microbatch:
            self.param_to_bucket[param].register_grad_ready(param)
