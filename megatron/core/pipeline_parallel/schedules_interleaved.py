"""Interleaved 1F1B schedule: several model chunks (virtual stages) per pipeline rank (Megatron-LM).

With ``pp`` ranks and ``v`` chunks per rank, the model is cut into ``pp * v`` virtual stages: rank
``r`` holds virtual stages ``r, r + pp, r + 2 pp, ...``. Micro-batches go through the chunks in
groups of ``pp``: forward micro-batch ``k`` (counted over all chunks, ``k < num_microbatches * v``)
runs on chunk ``(k mod (pp v)) // pp``; backwards visit the chunks in reverse order. Activations
travel in a ring: the last rank's chunk ``c`` sends to the first rank's chunk ``c + 1``.
``num_microbatches`` must be a multiple of ``pp``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import p2p_communication as p2p
from megatron.core.pipeline_parallel.schedules import (
    GradSyncControl,
    backward_step,
    deallocate_output_tensor,
    forward_step,
    get_model_config,
)


class _Plan:
    """Which chunk handles the k-th forward / backward micro-batch, and when a chunk is done."""

    def __init__(self, pp: int, num_chunks: int, num_microbatches: int):
        self.pp, self.num_chunks = pp, num_chunks
        self.group = pp * num_chunks
        self.total = num_microbatches * num_chunks

    def chunk_id(self, k: int, forward: bool) -> int:
        chunk = (k % self.group) // self.pp
        return chunk if forward else self.num_chunks - chunk - 1

    def is_last_microbatch_for_chunk(self, k: int) -> bool:
        """Backward micro-batch ``k`` is the last one of its chunk."""
        group, index = divmod(k, self.group)
        return group == self.total // self.group - 1 and index % self.pp == self.pp - 1


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func: Callable, data_iterator: Union[Iterator, List[Iterator]],
        model: List[torch.nn.Module], num_microbatches: int, seq_length: int, micro_batch_size: int,
        decoder_seq_length: Optional[int] = None, forward_only: bool = False,
        collect_non_loss_data: bool = False) -> List[Dict[str, torch.Tensor]]:
    """Interleaved 1F1B over ``len(model)`` chunks; ``data_iterator`` is a list with one iterator per chunk.

    Warm-up runs ``2 (pp - rank - 1) + (v - 1) pp`` forwards (all of them when ``num_microbatches ==
    pp`` or forward_only), then alternates one forward and one backward, then drains the backwards.
    """
    if not isinstance(model, list) or not isinstance(data_iterator, list):
        raise ValueError("the interleaved schedule needs a list of model chunks and a list of data iterators")
    if len(data_iterator) != len(model):
        raise ValueError(f"{len(model)} model chunks but {len(data_iterator)} data iterators")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if num_microbatches % pp != 0:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) to be "
                         f"divisible by --pipeline-model-parallel-size ({pp})")
    config = get_model_config(model[0])
    shape = p2p.get_tensor_shape(config, seq_length, micro_batch_size)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    num_chunks = len(model)
    plan = _Plan(pp, num_chunks, num_microbatches)
    total = plan.total
    all_warmup = forward_only or num_microbatches == pp
    num_warmup = total if all_warmup else min((pp - rank - 1) * 2 + (num_chunks - 1) * pp, total)
    num_remaining = total - num_warmup
    first_rank = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last_rank = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    input_tensors: List[List[Any]] = [[] for _ in model]
    output_tensors: List[List[Any]] = [[] for _ in model]
    output_tensor_grads: List[List[Any]] = [[] for _ in model]
    store: List[Any] = []
    sync = GradSyncControl(config, num_chunks)
    set_vp_rank = parallel_state.set_virtual_pipeline_model_parallel_rank

    def forward_helper(k: int):
        chunk = plan.chunk_id(k, forward=True)
        set_vp_rank(chunk)
        if parallel_state.is_pipeline_first_stage() and len(input_tensors[chunk]) == len(output_tensors[chunk]):
            input_tensors[chunk].append(None)
        input_tensor = input_tensors[chunk][-1]
        is_last = parallel_state.is_pipeline_last_stage()
        output_tensor = forward_step(forward_step_func, data_iterator[chunk], model[chunk], num_microbatches,
                                     input_tensor, store, config, collect_non_loss_data, is_last_stage=is_last)
        output_tensors[chunk].append(output_tensor)
        if forward_only:
            input_tensors[chunk].pop()
            output_tensors[chunk].pop()
        return output_tensor, is_last

    def backward_helper(k: int):
        chunk = plan.chunk_id(k, forward=False)
        set_vp_rank(chunk)
        if plan.is_last_microbatch_for_chunk(k):
            sync.enable(chunk)
        if k == total - 1:
            sync.enable()
        if parallel_state.is_pipeline_last_stage() and len(output_tensor_grads[chunk]) == 0:
            output_tensor_grads[chunk].append(None)
        input_tensor = input_tensors[chunk].pop(0)
        output_tensor = output_tensors[chunk].pop(0)
        output_tensor_grad = output_tensor_grads[chunk].pop(0)
        return backward_step(input_tensor, output_tensor, output_tensor_grad, config)

    def send_out(output_tensor, is_last):
        """What to send forward after a forward step: nothing from the model's very last virtual stage."""
        if is_last:
            return None
        deallocate_later.append(output_tensor)
        return output_tensor

    deallocate_later: List[torch.Tensor] = []

    def free_sent():
        while deallocate_later:
            deallocate_output_tensor(deallocate_later.pop(), config.deallocate_pipeline_outputs and not forward_only)

    if not forward_only:
        sync.disable()
    try:
        # Warm-up: forwards only (the last one also receives the first gradient).
        set_vp_rank(0)
        input_tensors[0].append(p2p.recv_forward(shape, config))
        for k in range(num_warmup):
            output_tensor, is_last = forward_helper(k)
            output_tensor = send_out(output_tensor, is_last)
            next_chunk = plan.chunk_id(k + 1, forward=True)
            recv_prev = not (first_rank and next_chunk == 0) and k != total - 1
            if k == num_warmup - 1 and not all_warmup:
                input_tensor, output_tensor_grad = p2p.send_forward_backward_recv_forward_backward(
                    output_tensor, None, recv_prev, not last_rank, shape, config)
                output_tensor_grads[num_chunks - 1].append(output_tensor_grad)
            else:
                input_tensor = p2p.send_forward_recv_forward(output_tensor, recv_prev, shape, config)
            free_sent()
            if recv_prev:
                input_tensors[next_chunk].append(input_tensor)

        # Steady state: one forward and one backward per step.
        for k in range(num_remaining):
            forward_k, backward_k = k + num_warmup, k
            output_tensor, is_last = forward_helper(forward_k)
            output_tensor = send_out(output_tensor, is_last)
            input_tensor_grad = backward_helper(backward_k)
            if parallel_state.is_pipeline_first_stage():  # vp rank = the backward chunk
                input_tensor_grad = None
            if first_rank:
                next_forward_chunk = plan.chunk_id(forward_k - (pp - 1), forward=True)
                recv_prev = next_forward_chunk != num_chunks - 1
                next_forward_chunk += 1
            else:
                recv_prev, next_forward_chunk = True, plan.chunk_id(forward_k + 1, forward=True)
            if last_rank:
                next_backward_chunk = plan.chunk_id(backward_k - (pp - 1), forward=False)
                recv_next = next_backward_chunk != 0
                next_backward_chunk -= 1
            else:
                recv_next, next_backward_chunk = True, plan.chunk_id(backward_k + 1, forward=False)
            if k == num_remaining - 1:
                recv_prev = False
            input_tensor, output_tensor_grad = p2p.send_forward_backward_recv_forward_backward(
                output_tensor, input_tensor_grad, recv_prev, recv_next, shape, config)
            free_sent()
            if recv_prev:
                input_tensors[next_forward_chunk].append(input_tensor)
            if recv_next:
                output_tensor_grads[next_backward_chunk].append(output_tensor_grad)

        # Cool-down: the remaining backwards.
        if not forward_only:
            if all_warmup:
                set_vp_rank(num_chunks - 1)
                output_tensor_grads[num_chunks - 1].append(p2p.recv_backward(shape, config))
            for k in range(num_remaining, total):
                input_tensor_grad = backward_helper(k)
                if parallel_state.is_pipeline_first_stage():
                    input_tensor_grad = None
                next_chunk = plan.chunk_id(k + 1, forward=False)
                recv_next = not (last_rank and next_chunk == num_chunks - 1) and k != total - 1
                grad = p2p.send_backward_recv_backward(input_tensor_grad, recv_next, shape, config)
                if recv_next:
                    output_tensor_grads[next_chunk].append(grad)
    finally:
        sync.enable()
        set_vp_rank(0)
    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func(model)
    return store
