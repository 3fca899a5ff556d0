"""Small training-side helpers: rank-aware printing, DP loss averaging, FLOPs per iteration."""

from __future__ import annotations

from datetime import datetime
from typing import List

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def print_rank_0(message: str) -> None:
    """Print once, from global rank 0."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    """Print once, from the last global rank (it sits on the last pipeline stage and has the loss)."""
    if is_last_rank():
        print(message, flush=True)


def print_datetime(message: str) -> None:
    print_rank_0(f"[{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] {message}")


def collective_device() -> torch.device:
    """Device for small tensors passed to collectives: NCCL groups only take CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_losses_across_data_parallel_group(losses: List[torch.Tensor]) -> torch.Tensor:
    """Mean of each loss over the data-parallel group (detached)."""
    averaged = torch.cat([loss.clone().detach().view(1) for loss in losses])
    dist.all_reduce(averaged, group=parallel_state.get_data_parallel_group())
    return averaged / dist.get_world_size(group=parallel_state.get_data_parallel_group())


def num_floating_point_operations(args, batch_size: int) -> float:
    """Model FLOPs of one training iteration (forward + backward) on ``batch_size`` sequences.

    Megatron-LM's formula for a GPT with a non-gated MLP:
    12 * B * s * L * h^2 * (2 + s/h + ffn/h + V/(2 L h)) for forward+backward (3x forward), which
    for ffn = 4h is 72 * B * s * L * h^2 * (1 + s/(6h) + V/(12 L h)). Full activation
    recomputation runs the layers' forward a second time (4x forward instead of 3x).
    """
    s, L, h = args.seq_length, args.num_layers, args.hidden_size
    ffn, vocab = args.ffn_hidden_size, args.padded_vocab_size
    passes = 4 if getattr(args, "recompute_granularity", None) == "full" else 3
    layers = 2 * 2 * passes * batch_size * s * L * h * h * (2 + s / h + ffn / h)
    logits = 2 * 3 * batch_size * s * h * vocab  # output layer, fwd+bwd; never recomputed
    return float(layers + logits)
