"""Broadcast a batch from tensor-parallel rank 0 to the other ranks of its TP group."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from megatron.core.parallel_state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
)


def broadcast_data(keys: Iterable[str], data: Optional[Dict[str, torch.Tensor]], datatype: torch.dtype,
                   device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Return ``{key: tensor}`` on every TP rank, read from ``data`` on TP rank 0.

    Only TP rank 0 needs ``data``; shapes are broadcast first, then one flat buffer of ``datatype``.
    """
    keys = list(keys)
    device = device or torch.device("cpu")
    if get_tensor_model_parallel_world_size() == 1:
        return {k: data[k].to(device=device, dtype=datatype) for k in keys}
    group, src = get_tensor_model_parallel_group(), get_tensor_model_parallel_src_rank()
    max_dims = 8
    sizes = torch.zeros(len(keys), max_dims, dtype=torch.long, device=device)
    if get_tensor_model_parallel_rank() == 0:
        for i, k in enumerate(keys):
            if data[k].dim() > max_dims:
                raise ValueError(f"broadcast_data supports at most {max_dims} dims (key {k})")
            sizes[i, :data[k].dim()] = torch.tensor(data[k].shape)
    dist.broadcast(sizes, src, group=group)
    shapes = [[int(d) for d in row if d > 0] for row in sizes.tolist()]
    numels = [int(torch.tensor(s).prod()) if s else 0 for s in shapes]
    if get_tensor_model_parallel_rank() == 0:
        flat = torch.cat([data[k].to(device=device, dtype=datatype).reshape(-1) for k in keys])
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    dist.broadcast(flat, src, group=group)
    out, offset = {}, 0
    for k, shape, n in zip(keys, shapes, numels):
        out[k] = flat[offset:offset + n].view(shape)
        offset += n
    return out
