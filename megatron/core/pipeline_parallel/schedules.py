"""Forward-backward schedules over micro-batches.

``get_forward_backward_func()`` returns the schedule for the current layout. Every schedule has the
megatron-core signature::

    forward_backward_func(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
                          micro_batch_size, decoder_seq_length=None, forward_only=False,
                          collect_non_loss_data=False)

``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)``; on the last stage
``loss_func(output_tensor) -> (loss, {name: reduced_value})``. The loss is divided by the number of
micro-batches so the accumulated gradient is the mean over the global batch. Returns the list of
per-micro-batch reduced dicts (on the last stage; empty elsewhere).

Three schedules, as in Megatron-LM:

* :func:`forward_backward_no_pipelining` (PP = 1);
* :func:`forward_backward_pipelining_without_interleaving` (1F1B: warm-up forwards, steady
  one-forward-one-backward, cool-down backwards);
* :func:`forward_backward_pipelining_with_interleaving` (several model chunks per stage,
  ``--num-layers-per-virtual-pipeline-stage``), in schedules_interleaved.py.

Every schedule honours ``config.grad_scale_func`` (scales the last stage's loss before backward),
``config.no_sync_func`` (DP reduction deferred until each chunk's last micro-batch; a list gives one
per chunk) and ``config.finalize_model_grads_func`` (called once after the last backward).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import p2p_communication as p2p


def get_model_config(model: torch.nn.Module):
    """The TransformerConfig of a (possibly DDP-wrapped) model chunk."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        return get_model_config(model.module)
    if config is None:
        raise ValueError("the model has no .config attribute (TransformerConfig) for the schedule")
    return config


def forward_step(forward_step_func: Callable, data_iterator, model, num_microbatches: int, input_tensor,
                 forward_data_store: List[Any], config, collect_non_loss_data: bool = False,
                 is_last_stage: bool = True):
    """Run one micro-batch forward; on the last stage apply the loss function."""
    unwrapped = model
    while hasattr(unwrapped, "module") and not hasattr(unwrapped, "set_input_tensor"):
        unwrapped = unwrapped.module
    if hasattr(unwrapped, "set_input_tensor"):
        unwrapped.set_input_tensor(input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    if is_last_stage:
        if not collect_non_loss_data:
            loss, loss_reduced = loss_func(output_tensor)
            output_tensor = loss / num_microbatches
            forward_data_store.append(loss_reduced)
        else:
            forward_data_store.append(loss_func(output_tensor, non_loss_data=True))
    return output_tensor


def deallocate_output_tensor(output_tensor: Optional[torch.Tensor], deallocate: bool) -> None:
    """Free the data of an output already sent to the next stage (its grad_fn stays for backward).

    Only with ``config.deallocate_pipeline_outputs``; :func:`backward_step` then runs the autograd
    engine directly, since the tensor's shape no longer matches its gradient's.
    """
    if not deallocate or output_tensor is None:
        return
    if output_tensor._base is not None:
        raise RuntimeError("cannot deallocate a pipeline output that is a view of another tensor")
    output_tensor.data = torch.empty((1,), device=output_tensor.device, dtype=output_tensor.dtype)


def _custom_backward(output: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``torch.autograd.backward`` without the shape check (the output's data may have been freed)."""
    from torch.autograd import Variable

    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad_output,), keep_graph=False, create_graph=False, inputs=tuple(),
        allow_unreachable=True, accumulate_grad=True)


def backward_step(input_tensor, output_tensor, output_tensor_grad, config):
    """Backward of one micro-batch; returns the gradient w.r.t. ``input_tensor`` (or None).

    On the last stage ``output_tensor`` is the (micro-batch-averaged) loss and ``output_tensor_grad``
    is None: the loss is scaled by ``config.grad_scale_func``. Elsewhere ``output_tensor_grad`` is the
    gradient received from the next stage ([s, b, h]).
    """
    if input_tensor is not None:
        input_tensor.retain_grad()
    if output_tensor_grad is None and config.grad_scale_func is not None:
        output_tensor = config.grad_scale_func(output_tensor)
    if output_tensor_grad is not None and output_tensor_grad.dtype != output_tensor.dtype:
        output_tensor_grad = output_tensor_grad.to(output_tensor.dtype)
    if output_tensor_grad is not None and config.deallocate_pipeline_outputs:
        _custom_backward(output_tensor, output_tensor_grad)
    else:
        torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    return input_tensor.grad if input_tensor is not None else None


class GradSyncControl:
    """Enters ``config.no_sync_func`` context(s) and leaves them before the right last backward.

    ``no_sync_func`` is None, one callable (covering all chunks: leave it before the very last
    backward) or a list with one callable per model chunk (leave chunk ``c``'s before that chunk's
    last micro-batch backward, so its DP reduction can start while other chunks still run).
    """

    def __init__(self, config, num_chunks: int):
        funcs = config.no_sync_func
        if funcs is None:
            self.funcs, self.per_chunk = [], False
        elif callable(funcs):
            self.funcs, self.per_chunk = [funcs], False
        else:
            self.funcs, self.per_chunk = list(funcs), True
            if len(self.funcs) != num_chunks:
                raise ValueError(f"config.no_sync_func has {len(self.funcs)} entries for {num_chunks} model chunks")
        self._active: Dict[int, Any] = {}

    def disable(self) -> None:
        """Defer DP reduction on every chunk."""
        for i, func in enumerate(self.funcs):
            ctx = func()
            ctx.__enter__()
            self._active[i] = ctx

    def enable(self, chunk: Optional[int] = None) -> None:
        """Allow DP reduction for ``chunk`` (per-chunk funcs only) or, with None, for all chunks."""
        keys = list(self._active) if chunk is None else ([chunk] if self.per_chunk and chunk in self._active else [])
        for key in keys:
            self._active.pop(key).__exit__(None, None, None)


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator: Union[Iterator, List[Iterator]],
                                   model: Union[torch.nn.Module, List[torch.nn.Module]], num_microbatches: int,
                                   seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                                   forward_only: bool = False, collect_non_loss_data: bool = False
                                   ) -> List[Dict[str, torch.Tensor]]:
    """All micro-batches forward and backward on one stage; DP reduction deferred to the last one."""
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError("non-pipelined schedule expects a single model chunk")
        model = model[0]
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    config = get_model_config(model)
    no_sync = config.no_sync_func if config.no_sync_func is not None else contextlib.nullcontext
    forward_data_store: List[Any] = []
    with no_sync():
        for _ in range(num_microbatches - 1):
            out = forward_step(forward_step_func, data_iterator, model, num_microbatches, None,
                               forward_data_store, config, collect_non_loss_data)
            if not forward_only:
                backward_step(None, out, None, config)
    # The last micro-batch runs outside no_sync so the DP reduction can start during its backward.
    out = forward_step(forward_step_func, data_iterator, model, num_microbatches, None, forward_data_store,
                       config, collect_non_loss_data)
    if not forward_only:
        backward_step(None, out, None, config)
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func([model])
    return forward_data_store




def _check_pipeline_args(model, data_iterator, num_microbatches: int, seq_length: int, micro_batch_size: int):
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1 (got {num_microbatches})")
    if seq_length is None or micro_batch_size is None:
        raise ValueError("pipeline schedules need seq_length and micro_batch_size to size the p2p tensors")


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func: Callable, data_iterator: Union[Iterator, List[Iterator]],
        model: Union[torch.nn.Module, List[torch.nn.Module]], num_microbatches: int, seq_length: int,
        micro_batch_size: int, decoder_seq_length: Optional[int] = None, forward_only: bool = False,
        collect_non_loss_data: bool = False) -> List[Dict[str, torch.Tensor]]:
    """1F1B: ``pp - rank - 1`` warm-up forwards, then one forward + one backward per step, then cool-down.

    Stage ``r`` keeps at most ``pp - r`` micro-batches' activations alive. The DP reduction is deferred
    (``config.no_sync_func``) until the last micro-batch's backward.
    """
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError("the non-interleaved pipeline schedule expects one model chunk per stage; "
                             "use --num-layers-per-virtual-pipeline-stage for several")
        model = model[0]
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    _check_pipeline_args(model, data_iterator, num_microbatches, seq_length, micro_batch_size)
    config = get_model_config(model)
    shape = p2p.get_tensor_shape(config, seq_length, micro_batch_size)
    pp, rank = (parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_rank())
    last = parallel_state.is_pipeline_last_stage()
    num_warmup = min(pp - rank - 1, num_microbatches)
    num_remaining = num_microbatches - num_warmup
    sync = GradSyncControl(config, 1)
    if not forward_only:
        sync.disable()
    input_tensors: List[Any] = []
    output_tensors: List[Any] = []
    store: List[Any] = []

    def fwd(input_tensor):
        return forward_step(forward_step_func, data_iterator, model, num_microbatches, input_tensor, store, config,
                            collect_non_loss_data, is_last_stage=last)

    try:
        for _ in range(num_warmup):  # warm-up: forwards only
            input_tensor = p2p.recv_forward(shape, config)
            output_tensor = fwd(input_tensor)
            p2p.send_forward(output_tensor, shape, config)
            if not forward_only:
                input_tensors.append(input_tensor)
                output_tensors.append(output_tensor)
                deallocate_output_tensor(output_tensor, config.deallocate_pipeline_outputs and not last)
        input_tensor = p2p.recv_forward(shape, config) if num_remaining > 0 else None
        for i in range(num_remaining):  # steady state: 1F1B
            last_iteration = i == num_remaining - 1
            output_tensor = fwd(input_tensor)
            if forward_only:
                p2p.send_forward(output_tensor, shape, config)
                if not last_iteration:
                    input_tensor = p2p.recv_forward(shape, config)
                continue
            output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, shape, config)
            input_tensors.append(input_tensor)
            output_tensors.append(output_tensor)
            deallocate_output_tensor(output_tensor, config.deallocate_pipeline_outputs and not last)
            input_tensor, output_tensor = input_tensors.pop(0), output_tensors.pop(0)
            if num_warmup == 0 and last_iteration:
                sync.enable()  # this is the last micro-batch's backward
            input_tensor_grad = backward_step(input_tensor, output_tensor, output_tensor_grad, config)
            if last_iteration:
                input_tensor = None
                p2p.send_backward(input_tensor_grad, shape, config)
            else:
                input_tensor = p2p.send_backward_recv_forward(input_tensor_grad, shape, config)
        if not forward_only:
            for i in range(num_warmup):  # cool-down: the warm-up micro-batches' backwards
                if i == num_warmup - 1:
                    sync.enable()
                input_tensor, output_tensor = input_tensors.pop(0), output_tensors.pop(0)
                output_tensor_grad = p2p.recv_backward(shape, config)
                input_tensor_grad = backward_step(input_tensor, output_tensor, output_tensor_grad, config)
                p2p.send_backward(input_tensor_grad, shape, config)
    finally:
        sync.enable()
    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func([model])
    return store


def get_forward_backward_func() -> Callable:
    """The schedule for the current layout: no pipelining, 1F1B, or interleaved 1F1B (virtual stages)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
            from megatron.core.pipeline_parallel.schedules_interleaved import (
                forward_backward_pipelining_with_interleaving,
            )

            return forward_backward_pipelining_with_interleaving
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining


def __getattr__(name: str):
    if name == "forward_backward_pipelining_with_interleaving":
        from megatron.core.pipeline_parallel import schedules_interleaved

        return schedules_interleaved.forward_backward_pipelining_with_interleaving
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
