"""Small helpers for splitting tensors and vocabularies across tensor-parallel ranks."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def ensure_divisibility(numerator: int, denominator: int, what: str = "") -> None:
    """Raise ValueError unless ``numerator`` is divisible by ``denominator``."""
    if numerator % denominator != 0:
        raise ValueError(f"{what or numerator} ({numerator}) is not divisible by {denominator}")


def divide(numerator: int, denominator: int, what: str = "") -> int:
    """Exact integer division; raises ValueError if it is not exact."""
    ensure_divisibility(numerator, denominator, what)
    return numerator // denominator


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous_split_chunks: bool = False) -> Sequence[torch.Tensor]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension."""
    last_dim = tensor.dim() - 1
    last_dim_size = divide(tensor.size()[last_dim], num_partitions, "last dimension")
    chunks = torch.split(tensor, last_dim_size, dim=last_dim)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


class VocabUtility:
    """Vocabulary range ``[first, last)`` owned by a tensor-parallel rank."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int,
                                                  world_size: int) -> Tuple[int, int]:
        index_f = rank * per_partition_vocab_size
        return index_f, index_f + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
        per_partition_vocab_size = divide(global_vocab_size, world_size, "vocabulary size")
        return VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition_vocab_size, rank, world_size)


def split_for_rank(tensor: torch.Tensor, dim: int, rank: int, world_size: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of a full tensor, as Megatron splits master weights.

    With ``stride > 1`` the dimension is first cut into ``world_size * stride`` pieces and rank r
    takes pieces r, r + world_size, ... (used when several logical matrices are stacked).
    """
    size = tensor.size(dim)
    per_partition_per_stride = divide(size, world_size * stride, f"dimension {dim}")
    pieces: List[torch.Tensor] = list(torch.split(tensor, per_partition_per_stride, dim=dim))
    return torch.cat(pieces[rank::world_size], dim=dim).contiguous()
