"""Data-parallel gradient reduction: DDP wrapper with bucketed (overlapped) all-reduce, finalize_model_grads."""

from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel
from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.distributed.param_and_grad_buffer import Bucket, ParamAndGradBuffer

__all__ = ["DistributedDataParallel", "DistributedDataParallelConfig", "finalize_model_grads", "Bucket",
           "ParamAndGradBuffer"]
