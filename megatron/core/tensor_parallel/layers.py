"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Weights are initialised TP-invariantly: the full master weight is drawn from the (TP-identical)
default generator and each rank keeps its slice, so the same seed gives the same global weights at
any tensor-parallel size. Sharded parameters carry ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.utils import VocabUtility, divide, split_for_rank

_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1}


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True if the parameter is sharded, or this is TP rank 0 (counts each parameter once)."""
    return getattr(param, "tensor_model_parallel", False) or get_tensor_model_parallel_rank() == 0


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int) -> None:
    """Mark ``tensor`` as (not) split along ``dim`` with ``stride``."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    for attribute, default in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, attribute):
            setattr(tensor, attribute, default)


def copy_tensor_model_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    for attribute in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(source, attribute):
            setattr(destination, attribute, getattr(source, attribute))


def _initialize_affine_weight(weight: nn.Parameter, full_shape: Tuple[int, int], partition_dim: int,
                              init_method: Callable, stride: int, config: ModelParallelConfig,
                              return_master_weight: bool = False) -> Optional[torch.Tensor]:
    """Draw the full [out, in] master weight in fp32 and copy this rank's slice into ``weight``."""
    set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
    if not config.perform_initialization:
        return None
    device = torch.device("cpu") if config.use_cpu_initialization else weight.device
    master = torch.empty(full_shape, dtype=torch.float32, device=device)
    init_method(master)
    shard = split_for_rank(master, partition_dim, get_tensor_model_parallel_rank(),
                           get_tensor_model_parallel_world_size(), stride)
    with torch.no_grad():
        weight.copy_(shard.to(dtype=weight.dtype, device=weight.device))
    return master if return_master_weight else None


def _default_device(config: ModelParallelConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class ColumnParallelLinear(nn.Module):
    """Linear layer ``Y = XA + b`` with ``A`` split by columns: ``A = [A_1, ..., A_p]``.

    Each rank holds weight ``A_i`` of shape [output_size/p, input_size] and computes
    ``Y_i = X A_i + b_i``. With ``gather_output`` the outputs are all-gathered to the full
    [*, output_size]; otherwise each rank keeps its [*, output_size/p] part (to feed a row-parallel
    layer). With sequence parallelism the input arrives as [s/p, b, h] and is all-gathered first.

    Args:
        input_size: first dimension of A.
        output_size: second dimension of A (split across TP ranks).
        config: parallelism / precision settings.
        init_method: callable filling a full-size fp32 weight in place.
        bias: add a bias (initialised to zero, split like the output).
        gather_output: all-gather the output so every rank has [*, output_size].
        skip_bias_add: return the bias separately instead of adding it (for fused bias ops).
        stride: >1 when the columns hold several interleaved logical matrices.

    Returns from forward: ``(output, bias_or_None)``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool = True, gather_output: bool = False, stride: int = 1,
                 keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 skip_weight_param_allocation: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name: Optional[str] = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.config = config
        world_size = get_tensor_model_parallel_world_size()
        self.output_size_per_partition = divide(output_size, world_size, "ColumnParallelLinear output size")
        self.sequence_parallel = config.sequence_parallel and world_size > 1
        if self.sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output is incompatible with sequence parallelism")
        device = _default_device(config)
        if not skip_weight_param_allocation:
            self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                                   dtype=config.params_dtype, device=device))
            self.master_weight = _initialize_affine_weight(
                self.weight, (output_size, input_size), 0, init_method, stride, config,
                return_master_weight=keep_master_weight_for_test)
        else:
            self.weight = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=config.params_dtype,
                                                 device=device))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None):
        """input_: [s, b, h] (or [s/p, b, h] with sequence parallelism) -> ([s, b, out/p or out], bias)."""
        if weight is None:
            if self.weight is None:
                raise RuntimeError("weight was not supplied to ColumnParallelLinear.forward and "
                                   "skip_weight_param_allocation is True")
            weight = self.weight
        if self.sequence_parallel:
            input_parallel = gather_from_sequence_parallel_region(input_)  # [s, b, h]
        else:
            input_parallel = copy_to_tensor_model_parallel_region(input_)
        bias = self.bias if not self.skip_bias_add else None
        output_parallel = F.linear(input_parallel, weight, bias)  # [s, b, out/p]
        output = gather_from_tensor_model_parallel_region(output_parallel) if self.gather_output else output_parallel
        return output, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.input_size}, out_features={self.output_size}, "
                f"out_per_partition={self.output_size_per_partition}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Linear layer ``Y = XA + b`` with ``A`` split by rows and ``X`` by columns.

    ``A = [A_1; ...; A_p]`` (each [input_size/p, output_size], stored as [output_size, input_size/p]),
    ``X = [X_1, ..., X_p]``; each rank computes ``X_i A_i`` and the partial results are all-reduced
    (or reduce-scattered along the sequence with sequence parallelism). The bias is not split; it is
    added once after the reduction.

    Args:
        input_size: first dimension of A (split across TP ranks).
        output_size: second dimension of A.
        config, init_method, bias, skip_bias_add, stride: as for :class:`ColumnParallelLinear`.
        input_is_parallel: the input is already split by columns (e.g. from a column-parallel layer);
            otherwise it is scattered here. Must be True with sequence parallelism.

    Returns from forward: ``(output, bias_or_None)``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool = True, input_is_parallel: bool = False, skip_bias_add: bool = False, stride: int = 1,
                 keep_master_weight_for_test: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name: Optional[str] = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.config = config
        world_size = get_tensor_model_parallel_world_size()
        self.input_size_per_partition = divide(input_size, world_size, "RowParallelLinear input size")
        self.sequence_parallel = config.sequence_parallel and world_size > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence parallelism needs input_is_parallel=True")
        device = _default_device(config)
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               dtype=config.params_dtype, device=device))
        self.master_weight = _initialize_affine_weight(
            self.weight, (output_size, input_size), 1, init_method, stride, config,
            return_master_weight=keep_master_weight_for_test)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
            # With sequence parallelism each rank sees a different part of the sequence, so the bias
            # gradients must be all-reduced over TP (finalize_model_grads does it).
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor):
        """input_: [s, b, in/p] (or [s, b, in] if not parallel) -> ([s, b, out] or [s/p, b, out], bias)."""
        input_parallel = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(input_)
        output_parallel = F.linear(input_parallel, self.weight)  # [s, b, out], partial sum over TP
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel)  # [s/p, b, out]
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel)
        if self.skip_bias_add or self.bias is None:
            return output, (self.bias if self.skip_bias_add else None)
        return output + self.bias, None

    def extra_repr(self) -> str:
        return (f"in_features={self.input_size}, out_features={self.output_size}, "
                f"in_per_partition={self.input_size_per_partition}, bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: rank i holds rows [i*V/p, (i+1)*V/p).

    Each rank looks up the ids in its range (others give zeros) and the results are all-reduced.

    Args:
        num_embeddings: vocabulary size (padded; divisible by the TP size).
        embedding_dim: hidden size.
        init_method: callable filling the full fp32 [V, h] table in place.
        config: parallelism / precision settings.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: Callable,
                 config: ModelParallelConfig, reduce_scatter_embeddings: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        world_size = get_tensor_model_parallel_world_size()
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, get_tensor_model_parallel_rank(), world_size)
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=config.params_dtype, device=_default_device(config)))
        _initialize_affine_weight(self.weight, (num_embeddings, embedding_dim), 0, init_method, 1, config)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """input_: int ids [b, s] -> [b, s, h] (or [s/p, b, h]-style reduce-scatter if requested)."""
        if get_tensor_model_parallel_world_size() > 1:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            masked_input = input_.clone() - self.vocab_start_index
            masked_input[input_mask] = 0
        else:
            masked_input = input_
        output_parallel = F.embedding(masked_input, self.weight)  # [b, s, h]
        if get_tensor_model_parallel_world_size() > 1:
            output_parallel = output_parallel.masked_fill(input_mask.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()  # [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(output_parallel)
        return reduce_from_tensor_model_parallel_region(output_parallel)
