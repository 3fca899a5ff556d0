"""DistributedDataParallel: main_grad buffers, grad accumulation hooks and bucketed DP all-reduce.

Usage per global batch (what the training loop does)::

    model.zero_grad_buffer(); optimizer.zero_grad()
    for i, micro_batch in enumerate(micro_batches):
        ctx = model.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext()
        with ctx:
            (loss(model(micro_batch)) / len(micro_batches)).backward()
    finalize_model_grads([model])   # = model.finish_grad_sync() + embedding / sequence-parallel reductions
    optimizer.step()                # reads param.main_grad
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.distributed.param_and_grad_buffer import ParamAndGradBuffer

logger = logging.getLogger(__name__)


class DistributedDataParallel(torch.nn.Module):
    """Wrap ``module`` for data-parallel training.

    Every trainable param gets ``param.main_grad``, a view into a contiguous buffer (fp32 when
    ``ddp_config.grad_reduce_in_fp32`` or the param is fp32, else the param dtype). After each
    backward a hook adds ``param.grad`` into ``param.main_grad`` and frees ``param.grad``, so grads
    accumulate over micro-batches. :meth:`finish_grad_sync` averages the buffers over the DP group
    (bucketed; with ``overlap_grad_reduce`` the buckets were already launched asynchronously during
    the last micro-batch's backward).

    Args:
        config: the model's config (TransformerConfig / ModelParallelConfig); kept as ``self.config``.
        ddp_config: gradient reduction settings.
        module: the model (chunk) to wrap.
        data_parallel_group: override of ``parallel_state.get_data_parallel_group()``.
        disable_bucketing: one bucket per buffer even when overlapping.
    """

    def __init__(self, config, ddp_config: DistributedDataParallelConfig, module: torch.nn.Module,
                 data_parallel_group=None, disable_bucketing: bool = False):
        super().__init__()
        self.config = config
        self.ddp_config = ddp_config
        self.module = module
        if data_parallel_group is None:
            data_parallel_group = parallel_state.get_data_parallel_group()
        self.data_parallel_group = data_parallel_group
        dp_size = dist.get_world_size(group=data_parallel_group)

        bucket_size = ddp_config.bucket_size
        if bucket_size is None:
            bucket_size = max(40_000_000, 1_000_000 * dp_size)
        if not ddp_config.overlap_grad_reduce or disable_bucketing:
            bucket_size = None
        self.bucket_size = bucket_size
        scaling = 1.0 if ddp_config.average_in_collective else 1.0 / dp_size

        grouped: Dict[Tuple[torch.dtype, torch.dtype], List[torch.nn.Parameter]] = {}
        for param in self.module.parameters():
            if not param.requires_grad:
                continue
            param.grad_added_to_main_grad = False
            grad_dtype = torch.float32 if ddp_config.grad_reduce_in_fp32 else param.dtype
            grouped.setdefault((param.dtype, grad_dtype), []).append(param)

        self.buffers: List[ParamAndGradBuffer] = []
        self.param_to_buffer: Dict[torch.nn.Parameter, ParamAndGradBuffer] = {}
        for (param_dtype, grad_dtype), params in grouped.items():
            buffer = ParamAndGradBuffer(ddp_config, param_dtype, grad_dtype, params, data_parallel_group,
                                        bucket_size, scaling)
            self.buffers.append(buffer)
            for param in params:
                self.param_to_buffer[param] = buffer

        self._hook_handles = [param.register_post_accumulate_grad_hook(self._make_param_hook())
                              for param in self.param_to_buffer]

    def _make_param_hook(self):
        def param_hook(param: torch.nn.Parameter) -> None:
            if param.grad is not None and not getattr(param, "grad_added_to_main_grad", False):
                param.main_grad.add_(param.grad.data)  # [param shape], promotes to the buffer dtype
            param.grad = None
            self.param_to_buffer[param].register_grad_ready(param)
        return param_hook

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks are looked up on the wrapped module (e.g. ``set_input_tensor``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    @contextmanager
    def no_sync(self):
        """Accumulate grads without launching the DP reduction (all micro-batches but the last)."""
        for buffer in self.buffers:
            buffer.is_last_microbatch = False
        try:
            yield
        finally:
            for buffer in self.buffers:
                buffer.is_last_microbatch = True

    def start_grad_sync(self, *unused) -> None:
        """Launch the DP all-reduce of every bucket that has not been launched yet."""
        for buffer in self.buffers:
            for bucket in buffer.buckets:
                if not bucket.communication_issued:
                    bucket.start_grad_sync()

    def finish_grad_sync(self) -> None:
        """Finish (or run) the DP all-reduce of all grads; after it ``main_grad`` holds the DP average."""
        for buffer in self.buffers:
            buffer.finish_grad_sync()

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` and reset bucket state; call at the start of each global batch."""
        for param in self.param_to_buffer:
            param.grad_added_to_main_grad = False
            param.grad = None
        for buffer in self.buffers:
            buffer.reset()

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Copy the params of DP rank 0 to all DP replicas."""
        src = dist.get_global_rank(self.data_parallel_group, 0)
        for param in self.module.parameters():
            dist.broadcast(param.data, src=src, group=self.data_parallel_group)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        inner = self.module
        if hasattr(inner, "state_dict_for_save_checkpoint"):
            return inner.state_dict_for_save_checkpoint(prefix=prefix, keep_vars=keep_vars)
        return inner.state_dict(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: Optional[bool] = None):
        if assign:
            raise ValueError("load_state_dict(assign=True) would detach params from their main_grad buffers")
        return self.module.load_state_dict(state_dict, strict=strict)
