"""finalize_model_grads: every gradient reduction needed between the last backward and optimizer.step().

1. data-parallel average (``finish_grad_sync`` of each DDP chunk);
2. sum over TP of the grads of params marked ``sequence_parallel`` (LayerNorms see only their
   sequence shard when sequence parallelism is on);
3. with PP > 1 and tied embeddings, sum over the embedding group (first and last stage) of the word
   embedding grads, so both copies take the same step.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while "module" in getattr(module, "_modules", {}):
        module = module._modules["module"]
    return module


def _main_grad(param: torch.nn.Parameter, what: str) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    if grad is None:
        raise RuntimeError(f"{what} has no gradient (neither main_grad nor grad); did backward run on this stage?")
    return grad


def get_shared_word_embedding_weight(model_chunk: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """This stage's copy of the tied word-embedding / output weight, or None if untied or absent.

    Found through the model's ``shared_embedding_or_output_weight()`` (megatron-core models; honours
    ``share_embeddings_and_output_weights``), else the param marked ``shared_embedding=True``.
    """
    inner = _unwrap(model_chunk)
    if getattr(inner, "share_embeddings_and_output_weights", True) is False:
        return None
    getter = getattr(inner, "shared_embedding_or_output_weight", None)
    if callable(getter):
        return getter()
    for param in inner.parameters():
        if getattr(param, "shared_embedding", False):
            return param
    return None


def _allreduce_word_embedding_grads(model: List[torch.nn.Module]) -> None:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        model_chunk = model[-1]
    else:
        model_chunk = model[0]
    weight = get_shared_word_embedding_weight(model_chunk)
    if weight is not None:
        dist.all_reduce(_main_grad(weight, "the tied word embedding"), group=parallel_state.get_embedding_group())


def _allreduce_layernorm_grads(model: List[torch.nn.Module], config) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    if config is not None and not getattr(config, "sequence_parallel", False):
        return
    grads = []
    for model_chunk in model:
        for name, param in model_chunk.named_parameters():
            if param.requires_grad and getattr(param, "sequence_parallel", False):
                grads.append(_main_grad(param, name).data)
    if grads:
        coalesced = _flatten_dense_tensors(grads)
        dist.all_reduce(coalesced, group=parallel_state.get_tensor_model_parallel_group())
        for buf, synced in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
            buf.copy_(synced)


def finalize_model_grads(model: List[torch.nn.Module], config=None) -> None:
    """All-reduce grads across DP, TP (sequence-parallel params) and the embedding group.

    Args:
        model: the model chunks (DDP-wrapped or plain modules; plain ones are not DP-reduced).
        config: the model config; its ``sequence_parallel`` gates step 2 (default: the first chunk's
            ``config`` attribute; without any config, params marked ``sequence_parallel`` are reduced).
    """
    if isinstance(model, torch.nn.Module):
        model = [model]
    if config is None:
        config = getattr(model[0], "config", None)
    for model_chunk in model:
        finish = getattr(model_chunk, "finish_grad_sync", None)
        if callable(finish):
            finish()
    _allreduce_layernorm_grads(model, config)
    _allreduce_word_embedding_grads(model)
