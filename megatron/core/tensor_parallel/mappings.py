"""Communication ops between tensor-parallel regions, as autograd-aware pairs.

Forward / backward pairs (TP = tensor-model-parallel group):

=============================================  ==========================  =========================
function                                        forward                     backward
=============================================  ==========================  =========================
copy_to_tensor_model_parallel_region            identity                    all-reduce
reduce_from_tensor_model_parallel_region        all-reduce                  identity
scatter_to_tensor_model_parallel_region         split last dim              all-gather last dim
gather_from_tensor_model_parallel_region        all-gather last dim         split last dim
scatter_to_sequence_parallel_region             split dim 0                 all-gather dim 0
gather_from_sequence_parallel_region            all-gather dim 0            reduce-scatter dim 0 (*)
reduce_scatter_to_sequence_parallel_region      reduce-scatter dim 0        all-gather dim 0
=============================================  ==========================  =========================

(*) or a plain split when ``tensor_parallel_output_grad=False``.
With one TP rank every op is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.parallel_state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from megatron.core.tensor_parallel.utils import divide, split_tensor_along_last_dim

# torch >= 2.11 renamed the tensor-output collectives; keep working on older releases.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce(input_: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) over the TP group; returns a new tensor."""
    if get_tensor_model_parallel_world_size() == 1:
        return input_
    output = input_.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(output, group=get_tensor_model_parallel_group())
    return output


def _split_along_last_dim(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    return split_tensor_along_last_dim(input_, world_size)[get_tensor_model_parallel_rank()].contiguous()


def _gather_along_last_dim(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    parts = [torch.empty_like(input_) for _ in range(world_size)]
    dist.all_gather(parts, input_, group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1).contiguous()


def _split_along_first_dim(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    local = divide(input_.size(0), world_size, "sequence length (dim 0) under --sequence-parallel")
    rank = get_tensor_model_parallel_rank()
    return input_[rank * local:(rank + 1) * local].contiguous()


def _gather_along_first_dim(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    output = torch.empty((input_.size(0) * world_size,) + tuple(input_.shape[1:]),
                         dtype=input_.dtype, device=input_.device)
    _all_gather_into_tensor(output, input_, group=get_tensor_model_parallel_group())
    return output


def _reduce_scatter_along_first_dim(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    local = divide(input_.size(0), world_size, "sequence length (dim 0) under --sequence-parallel")
    output = torch.empty((local,) + tuple(input_.shape[1:]), dtype=input_.dtype, device=input_.device)
    _reduce_scatter_tensor(output, input_.contiguous(), group=get_tensor_model_parallel_group())
    return output


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return _reduce(grad_output)


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _reduce(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _split_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_last_dim(grad_output)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _gather_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_along_last_dim(grad_output)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _split_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, tensor_parallel_output_grad=True):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        # If the consumer of the gathered tensor is itself tensor-parallel (e.g. a column-parallel
        # linear), each rank holds a partial gradient that must be summed: reduce-scatter. Otherwise
        # every rank has the full gradient already and only needs its slice.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad_output), None
        return _split_along_first_dim(grad_output), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _reduce_scatter_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output)


def copy_to_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over TP in backward."""
    return _CopyToModelParallelRegion.apply(input_)


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    """All-reduce over TP forward; identity backward."""
    return _ReduceFromModelParallelRegion.apply(input_)


def scatter_to_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather the gradient in backward."""
    return _ScatterToModelParallelRegion.apply(input_)


def gather_from_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's gradient chunk in backward."""
    return _GatherFromModelParallelRegion.apply(input_)


def scatter_to_sequence_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    """[s, b, h] -> [s/tp, b, h] (this rank's chunk); backward all-gathers along dim 0."""
    return _ScatterToSequenceParallelRegion.apply(input_)


def gather_from_sequence_parallel_region(input_: torch.Tensor, tensor_parallel_output_grad: bool = True
                                         ) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h]; backward reduce-scatters (or splits) along dim 0."""
    return _GatherFromSequenceParallelRegion.apply(input_, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    """[s, b, h] partial sums -> [s/tp, b, h] summed over TP; backward all-gathers along dim 0."""
    return _ReduceScatterToSequenceParallelRegion.apply(input_)
