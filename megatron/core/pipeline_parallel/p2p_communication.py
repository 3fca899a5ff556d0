"""Point-to-point communication between pipeline stages (Megatron-LM's ``p2p_communication``).

Activations flow forward (stage ``i`` -> ``i + 1``) and their gradients backward. Every exchange
goes through :func:`_communicate`, which posts all sends and receives of one step as a single
``torch.distributed.batch_isend_irecv`` (gloo on CPU, NCCL on GPU) and waits for them.

Message order. Two messages between the same pair of ranks in one batch (with two stages, the
interleaved schedule sends an activation *and* a gradient to the same peer) must be matched
unambiguously, also by NCCL, which ignores tags. So every batch posts its forward-direction ops
(send to next, receive from previous) before its backward-direction ops (send to previous, receive
from next), and each direction has its own tag for gloo.

Shapes are known in advance: ``(seq_length, micro_batch_size, hidden_size)``, with ``seq_length /
tp`` under sequence parallelism; the dtype is ``config.pipeline_dtype``. The ``send_*``/``recv_*``
helpers skip the communication on the first/last stage (using the virtual-aware stage checks), as
Megatron does; the interleaved schedule uses the combined ops, whose arguments say what to exchange.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state

Shape = Sequence[int]

_FORWARD_TAG = 0  # activations: stage i -> i + 1
_BACKWARD_TAG = 1  # gradients: stage i + 1 -> i


def get_tensor_shape(config, seq_length: int, micro_batch_size: int) -> Tuple[int, int, int]:
    """Shape of the tensors exchanged between stages: [s, b, h], or [s/tp, b, h] with sequence parallelism."""
    if config.sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if seq_length % tp != 0:
            raise ValueError(f"--seq-length ({seq_length}) must be divisible by --tensor-model-parallel-size "
                             f"({tp}) with --sequence-parallel")
        seq_length //= tp
    return (seq_length, micro_batch_size, config.hidden_size)


def _device() -> torch.device:
    """Where received tensors live: the current CUDA device for NCCL, else CPU (gloo)."""
    if dist.get_backend(parallel_state.get_pipeline_model_parallel_group()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_send(tensor: torch.Tensor, shape: Shape, config, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise RuntimeError(f"pipeline {what}: tensor of shape {tuple(tensor.shape)} but the schedule expects "
                           f"{tuple(shape)} (seq, micro-batch, hidden); check --seq-length / --micro-batch-size")
    if tensor.dtype != config.pipeline_dtype:
        tensor = tensor.to(config.pipeline_dtype)
    return tensor.contiguous()


def _communicate(*, tensor_send_next: Optional[torch.Tensor], tensor_send_prev: Optional[torch.Tensor],
                 recv_prev: bool, recv_next: bool, tensor_shape: Shape, config
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Send to / receive from the neighbouring stages in one batched step.

    Args:
        tensor_send_next: activation [s, b, h] for the next stage, or None.
        tensor_send_prev: gradient [s, b, h] for the previous stage, or None.
        recv_prev: receive an activation from the previous stage.
        recv_next: receive a gradient from the next stage.
        tensor_shape: (seq, micro-batch, hidden) of every exchanged tensor.
        config: ModelParallelConfig (``pipeline_dtype``).

    Returns:
        (tensor_recv_prev, tensor_recv_next); received activations require grad.
    """
    device, dtype = _device(), config.pipeline_dtype
    group = parallel_state.get_pipeline_model_parallel_group()
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    tensor_recv_prev = tensor_recv_next = None
    if recv_prev:
        tensor_recv_prev = torch.empty(tuple(tensor_shape), dtype=dtype, device=device, requires_grad=True)
    if recv_next:
        tensor_recv_next = torch.empty(tuple(tensor_shape), dtype=dtype, device=device)
    ops: List[dist.P2POp] = []
    # Forward direction first, then backward direction (see the module docstring).
    if tensor_send_next is not None:
        tensor_send_next = _check_send(tensor_send_next, tensor_shape, config, "send to next stage")
        ops.append(dist.P2POp(dist.isend, tensor_send_next, next_rank, group, _FORWARD_TAG))
    if tensor_recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_prev, prev_rank, group, _FORWARD_TAG))
    if tensor_send_prev is not None:
        tensor_send_prev = _check_send(tensor_send_prev, tensor_shape, config, "send to previous stage")
        ops.append(dist.P2POp(dist.isend, tensor_send_prev, prev_rank, group, _BACKWARD_TAG))
    if tensor_recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_next, next_rank, group, _BACKWARD_TAG))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        if device.type == "cuda":
            torch.cuda.synchronize()  # as Megatron: guard against races with the batched NCCL kernels
    return tensor_recv_prev, tensor_recv_next


def recv_forward(tensor_shape: Shape, config) -> Optional[torch.Tensor]:
    """Activation from the previous stage (None on the first stage)."""
    if parallel_state.is_pipeline_first_stage():
        return None
    return _communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=True, recv_next=False,
                        tensor_shape=tensor_shape, config=config)[0]


def recv_backward(tensor_shape: Shape, config) -> Optional[torch.Tensor]:
    """Gradient of this stage's output from the next stage (None on the last stage)."""
    if parallel_state.is_pipeline_last_stage():
        return None
    return _communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=False, recv_next=True,
                        tensor_shape=tensor_shape, config=config)[1]


def send_forward(output_tensor: Optional[torch.Tensor], tensor_shape: Shape, config) -> None:
    """Send this stage's output to the next stage (nothing on the last stage)."""
    if parallel_state.is_pipeline_last_stage():
        return
    _communicate(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=False, recv_next=False,
                 tensor_shape=tensor_shape, config=config)


def send_backward(input_tensor_grad: Optional[torch.Tensor], tensor_shape: Shape, config) -> None:
    """Send the gradient of this stage's input to the previous stage (nothing on the first stage)."""
    if parallel_state.is_pipeline_first_stage():
        return
    _communicate(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=False, recv_next=False,
                 tensor_shape=tensor_shape, config=config)


def send_forward_recv_backward(output_tensor: Optional[torch.Tensor], tensor_shape: Shape,
                               config) -> Optional[torch.Tensor]:
    """Send the output forward and receive its gradient (None on the last stage)."""
    if parallel_state.is_pipeline_last_stage():
        return None
    return _communicate(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=False, recv_next=True,
                        tensor_shape=tensor_shape, config=config)[1]


def send_backward_recv_forward(input_tensor_grad: Optional[torch.Tensor], tensor_shape: Shape,
                               config) -> Optional[torch.Tensor]:
    """Send the input gradient backward and receive the next activation (None on the first stage)."""
    if parallel_state.is_pipeline_first_stage():
        return None
    return _communicate(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=True, recv_next=False,
                        tensor_shape=tensor_shape, config=config)[0]


def send_forward_recv_forward(output_tensor: Optional[torch.Tensor], recv_prev: bool, tensor_shape: Shape,
                              config) -> Optional[torch.Tensor]:
    """Interleaved schedule: send an activation forward, optionally receive one from the previous stage."""
    return _communicate(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=recv_prev,
                        recv_next=False, tensor_shape=tensor_shape, config=config)[0]


def send_backward_recv_backward(input_tensor_grad: Optional[torch.Tensor], recv_next: bool, tensor_shape: Shape,
                                config) -> Optional[torch.Tensor]:
    """Interleaved schedule: send a gradient backward, optionally receive one from the next stage."""
    return _communicate(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=False,
                        recv_next=recv_next, tensor_shape=tensor_shape, config=config)[1]


def send_forward_backward_recv_forward_backward(
        output_tensor: Optional[torch.Tensor], input_tensor_grad: Optional[torch.Tensor], recv_prev: bool,
        recv_next: bool, tensor_shape: Shape, config) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Interleaved steady state: both sends and both receives in one batch.

    Returns:
        (input_tensor from the previous stage or None, output_tensor_grad from the next stage or None).
    """
    return _communicate(tensor_send_next=output_tensor, tensor_send_prev=input_tensor_grad, recv_prev=recv_prev,
                        recv_next=recv_next, tensor_shape=tensor_shape, config=config)
