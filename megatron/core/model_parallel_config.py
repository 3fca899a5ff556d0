"""ModelParallelConfig: how a model is split across ranks and in what precision it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class ModelParallelConfig:
    """Parallelism and precision settings shared by all megatron.core layers.

    Attributes:
        tensor_model_parallel_size: ranks that split each layer's weights.
        pipeline_model_parallel_size: pipeline stages.
        virtual_pipeline_model_parallel_size: model chunks per stage (interleaved schedule).
        sequence_parallel: keep activations outside TP regions split along the sequence dim.
        perform_initialization: initialise weights (False when loading a checkpoint right away).
        use_cpu_initialization: build the full master weight on CPU, then keep this rank's slice.
            (Weights are always initialised TP-invariantly; this only chooses where.)
        params_dtype: dtype of the model parameters.
        fp16 / bf16: mixed precision mode of the model.
        pipeline_dtype: dtype of tensors sent between pipeline stages.
        batch_p2p_comm: use batch_isend_irecv for pipeline p2p.
        deallocate_pipeline_outputs: free pipeline output activations once sent.
        gradient_accumulation_fusion: accumulate weight grads into main_grad directly (CUDA only).
        grad_scale_func: ``f(loss) -> scaled loss`` applied before backward (the optimizer's loss scaler).
        no_sync_func: context manager factory that defers DP grad reduction (all but the last micro-batch).
        finalize_model_grads_func: ``f(model_chunks)`` run after the last backward (DP/TP/embedding sync).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    perform_initialization: bool = True
    use_cpu_initialization: bool = False
    params_dtype: torch.dtype = torch.float32
    fp16: bool = False
    bf16: bool = False
    pipeline_dtype: Optional[torch.dtype] = None
    batch_p2p_comm: bool = True
    deallocate_pipeline_outputs: bool = False
    gradient_accumulation_fusion: bool = False
    grad_scale_func: Optional[Callable] = None
    no_sync_func: Optional[Callable] = None
    finalize_model_grads_func: Optional[Callable] = None

    def __post_init__(self):
        if self.sequence_parallel and self.tensor_model_parallel_size <= 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 are mutually exclusive; pick one")
        if self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
