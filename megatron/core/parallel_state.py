"""Process groups for tensor-, pipeline- and data-parallelism, and rank queries.

Rank layout follows Megatron-LM: tensor-parallel (TP) groups are contiguous ranks, data-parallel
(DP) groups come next, pipeline-parallel (PP) is outermost::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

With 16 ranks, tp=2, pp=4 (so dp=2): TP groups [0,1],[2,3],...; DP groups [0,2],[1,3],[4,6],...;
PP groups [0,4,8,12],[1,5,9,13],...; embedding groups (first and last PP stage) [0,12],[1,13],...

All groups are computed by the pure function :func:`compute_rank_groups` and then created with
``torch.distributed.new_group`` (every rank creates every group, in the same order, as required).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch.distributed as dist

# Process groups this rank belongs to.
_TENSOR_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None
_MODEL_PARALLEL_GROUP = None
_EMBEDDING_GROUP = None
_POSITION_EMBEDDING_GROUP = None
# Global ranks of this rank's groups (handy for p2p and broadcasts).
_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS: Optional[List[int]] = None
_PIPELINE_GLOBAL_RANKS: Optional[List[int]] = None
_DATA_PARALLEL_GLOBAL_RANKS: Optional[List[int]] = None
_EMBEDDING_GLOBAL_RANKS: Optional[List[int]] = None
_POSITION_EMBEDDING_GLOBAL_RANKS: Optional[List[int]] = None
# Virtual pipeline (interleaved schedule) state.
_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK: Optional[int] = None
_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE: Optional[int] = None


def compute_rank_groups(world_size: int, tensor_model_parallel_size: int = 1,
                        pipeline_model_parallel_size: int = 1) -> Dict[str, List[List[int]]]:
    """Return every group of global ranks for a layout, without touching torch.distributed.

    Returns:
        dict with keys ``tensor``, ``data``, ``pipeline``, ``model``, ``embedding``,
        ``position_embedding``; each a list of rank lists.

    Raises:
        ValueError: if the sizes are not positive or world_size is not divisible by tp * pp.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
                         "must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size ({world_size}) is not divisible by tensor-model-parallel size ({tp}) x "
            f"pipeline-model-parallel size ({pp}) = {tp * pp}; launch a multiple of {tp * pp} processes "
            "or change --tensor-model-parallel-size / --pipeline-model-parallel-size")
    dp = world_size // (tp * pp)
    per_stage = world_size // pp  # = dp * tp

    tensor = [list(range(i * tp, (i + 1) * tp)) for i in range(world_size // tp)]
    data = [list(range(s * per_stage + j, (s + 1) * per_stage, tp)) for s in range(pp) for j in range(tp)]
    pipeline = [list(range(i, world_size, per_stage)) for i in range(per_stage)]
    model = [[s * per_stage + d * tp + t for s in range(pp) for t in range(tp)] for d in range(dp)]
    embedding, position_embedding = [], []
    for ranks in pipeline:
        embedding.append([ranks[0], ranks[-1]] if len(ranks) > 1 else [ranks[0]])
        position_embedding.append([ranks[0]])
    return {"tensor": tensor, "data": data, "pipeline": pipeline, "model": model,
            "embedding": embedding, "position_embedding": position_embedding}


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None) -> None:
    """Create the TP, PP, DP, model-parallel and embedding groups for this process.

    ``torch.distributed`` must already be initialized. Every rank must call this with the same sizes.

    Args:
        tensor_model_parallel_size: ranks that split each layer (contiguous ranks).
        pipeline_model_parallel_size: pipeline stages (outermost in the rank layout).
        virtual_pipeline_model_parallel_size: model chunks per stage for the interleaved schedule.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP, _POSITION_EMBEDDING_GROUP
    global _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS, _DATA_PARALLEL_GLOBAL_RANKS
    global _EMBEDDING_GLOBAL_RANKS, _POSITION_EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before initialize_model_parallel()")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialized; call destroy_model_parallel() first")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    groups = compute_rank_groups(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)

    if virtual_pipeline_model_parallel_size is not None:
        if pipeline_model_parallel_size < 2:
            raise ValueError("the interleaved schedule (--num-layers-per-virtual-pipeline-stage) needs "
                             "--pipeline-model-parallel-size > 1")
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = 0
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = virtual_pipeline_model_parallel_size

    def build(kind):
        mine, mine_ranks = None, None
        for ranks in groups[kind]:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine, mine_ranks = group, ranks
        return mine, mine_ranks

    _DATA_PARALLEL_GROUP, _DATA_PARALLEL_GLOBAL_RANKS = build("data")
    _MODEL_PARALLEL_GROUP, _ = build("model")
    _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = build("tensor")
    _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS = build("pipeline")
    _EMBEDDING_GROUP, _EMBEDDING_GLOBAL_RANKS = build("embedding")
    _POSITION_EMBEDDING_GROUP, _POSITION_EMBEDDING_GLOBAL_RANKS = build("position_embedding")


def model_parallel_is_initialized() -> bool:
    """True once :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def _require(group, name):
    if group is None:
        raise RuntimeError(f"{name} group is not initialized; call "
                           "megatron.core.parallel_state.initialize_model_parallel() first")
    return group


def get_tensor_model_parallel_group():
    return _require(_TENSOR_MODEL_PARALLEL_GROUP, "tensor model parallel")


def get_pipeline_model_parallel_group():
    return _require(_PIPELINE_MODEL_PARALLEL_GROUP, "pipeline model parallel")


def get_data_parallel_group():
    return _require(_DATA_PARALLEL_GROUP, "data parallel")


def get_model_parallel_group():
    return _require(_MODEL_PARALLEL_GROUP, "model parallel")


def get_embedding_group():
    return _require(_EMBEDDING_GROUP, "embedding")


def get_position_embedding_group():
    return _require(_POSITION_EMBEDDING_GROUP, "position embedding")


def get_tensor_model_parallel_world_size() -> int:
    return dist.get_world_size(group=get_tensor_model_parallel_group())


def get_tensor_model_parallel_rank() -> int:
    return dist.get_rank(group=get_tensor_model_parallel_group())


def get_pipeline_model_parallel_world_size() -> int:
    return dist.get_world_size(group=get_pipeline_model_parallel_group())


def get_pipeline_model_parallel_rank() -> int:
    return dist.get_rank(group=get_pipeline_model_parallel_group())


def get_data_parallel_world_size() -> int:
    return dist.get_world_size(group=get_data_parallel_group())


def get_data_parallel_rank() -> int:
    return dist.get_rank(group=get_data_parallel_group())


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group."""
    return _require(_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, "tensor model parallel")[0]


def get_tensor_model_parallel_global_ranks() -> List[int]:
    return list(_require(_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, "tensor model parallel"))


def get_data_parallel_global_ranks() -> List[int]:
    return list(_require(_DATA_PARALLEL_GLOBAL_RANKS, "data parallel"))


def get_data_parallel_src_rank() -> int:
    return get_data_parallel_global_ranks()[0]


def get_pipeline_model_parallel_global_ranks() -> List[int]:
    return list(_require(_PIPELINE_GLOBAL_RANKS, "pipeline model parallel"))


def get_pipeline_model_parallel_first_rank() -> int:
    return get_pipeline_model_parallel_global_ranks()[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return get_pipeline_model_parallel_global_ranks()[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    ranks = get_pipeline_model_parallel_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = get_pipeline_model_parallel_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = rank


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the first pipeline stage (and, unless ignore_virtual, the first virtual chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last pipeline stage (and, unless ignore_virtual, the last virtual chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK != _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE - 1:
            return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    """True if this rank holds a copy of the word embeddings that must be kept in sync."""
    if _EMBEDDING_GLOBAL_RANKS is None or dist.get_rank() not in _EMBEDDING_GLOBAL_RANKS:
        return False
    if ignore_virtual:
        return True
    if dist.get_rank() == _EMBEDDING_GLOBAL_RANKS[0]:
        return is_pipeline_first_stage()
    if dist.get_rank() == _EMBEDDING_GLOBAL_RANKS[-1]:
        return is_pipeline_last_stage()
    return True


def destroy_model_parallel() -> None:
    """Forget all groups (the process group of torch.distributed itself stays alive)."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP, _POSITION_EMBEDDING_GROUP
    global _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS, _DATA_PARALLEL_GLOBAL_RANKS
    global _EMBEDDING_GLOBAL_RANKS, _POSITION_EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    _TENSOR_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = None
    _MODEL_PARALLEL_GROUP = _EMBEDDING_GROUP = _POSITION_EMBEDDING_GROUP = None
    _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = _PIPELINE_GLOBAL_RANKS = _DATA_PARALLEL_GLOBAL_RANKS = None
    _EMBEDDING_GLOBAL_RANKS = _POSITION_EMBEDDING_GLOBAL_RANKS = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
