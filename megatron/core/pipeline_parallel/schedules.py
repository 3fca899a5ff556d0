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
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from megatron.core import parallel_state


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


def backward_step(input_tensor, output_tensor, output_tensor_grad, config):
    """Backward of one micro-batch; returns the gradient w.r.t. ``input_tensor`` (or None)."""
    if input_tensor is not None:
        input_tensor.retain_grad()
    if output_tensor_grad is None and config.grad_scale_func is not None:
        output_tensor = config.grad_scale_func(output_tensor)
    torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    return input_tensor.grad if input_tensor is not None else None


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


def get_forward_backward_func() -> Callable:
    """The schedule for the current pipeline layout."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("pipeline-parallel schedules are not implemented yet "
                                  "(--pipeline-model-parallel-size must be 1)")
    return forward_backward_no_pipelining
