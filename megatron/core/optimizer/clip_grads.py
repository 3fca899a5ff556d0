"""Global gradient norm, clipping and zero counting, each parameter counted once across TP/PP/DP.

Which grads count toward the norm (``MegatronOptimizer.get_main_grads_for_grad_norm``):

* params marked ``shared`` (the last pipeline stage's copy of tied word embeddings) are skipped;
* params that are not tensor-parallel shards (``tensor_model_parallel`` False/absent) are replicated on
  every TP rank and counted only on TP rank 0;
* grads are identical across data-parallel replicas after the DP all-reduce, so the squared norm is
  summed over the model-parallel group (TP x PP) only.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Union

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def param_is_not_shared(param: torch.Tensor) -> bool:
    """False for the duplicate copy of a parameter that lives on two pipeline stages."""
    return not getattr(param, "shared", False)


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True for TP shards on every rank, and for replicated params only on TP rank 0."""
    if getattr(param, "tensor_model_parallel", False):
        return True
    if not parallel_state.model_parallel_is_initialized():
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def default_model_parallel_group():
    """The TP x PP group when parallel state is initialized, else None (single process)."""
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_model_parallel_group()
    return None


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op, group=group)


def get_grad_norm_fp32(grads_for_norm: Union[torch.Tensor, Iterable[torch.Tensor]],
                       norm_type: Union[int, float] = 2, model_parallel_group=None) -> float:
    """Norm of ``grads_for_norm`` reduced over ``model_parallel_group``.

    Args:
        grads_for_norm: this rank's grads that count toward the norm (already deduplicated).
        norm_type: 2, any p > 0, or ``inf``.
        model_parallel_group: the group to reduce over (TP x PP); None means this process alone.

    Returns:
        The total norm as a Python float (identical on every rank of the group).
    """
    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    grads = [g.detach() for g in grads_for_norm]
    norm_type = float(norm_type)
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if norm_type == math.inf:
        local = max((g.abs().max().float() for g in grads), default=torch.tensor(0.0, device=device))
        total = torch.tensor([float(local)], dtype=torch.float, device=device)
        _all_reduce(total, dist.ReduceOp.MAX, model_parallel_group)
        return total[0].item()
    total = torch.zeros(1, dtype=torch.float, device=device)
    if grads:
        if norm_type == 2.0:
            norms = torch._foreach_norm([g.float() for g in grads])  # one fp32 norm per tensor
            total += torch.stack(norms).norm() ** 2.0
        else:
            for g in grads:
                total += torch.norm(g.float(), norm_type) ** norm_type
    _all_reduce(total, dist.ReduceOp.SUM, model_parallel_group)
    return total.item() ** (1.0 / norm_type)


def clip_grad_by_total_norm_fp32(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                                 total_norm: float) -> None:
    """Scale the ``.grad`` of ``parameters`` in place by ``max_norm / (total_norm + 1e-6)`` if that is < 1.

    Args:
        parameters: params whose (fp32) ``.grad`` is clipped; every param, duplicates included, is clipped.
        max_norm: the clipping threshold (``--clip-grad``).
        total_norm: the global norm from :func:`get_grad_norm_fp32`.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads: List[torch.Tensor] = []
    for param in parameters:
        if param.grad is not None:
            if param.grad.dtype != torch.float32:
                raise TypeError(f"clip_grad_by_total_norm_fp32 expects fp32 grads, got {param.grad.dtype}")
            grads.append(param.grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def count_zeros_fp32(parameters: Iterable[torch.Tensor], model_parallel_group=None) -> float:
    """Number of zero entries in the grads, each param counted once, summed over the model-parallel group."""
    total = None
    for param in parameters:
        if param.grad is None or not param_is_not_shared(param):
            continue
        if not param_is_not_tensor_parallel_duplicate(param):
            continue
        grad = param.grad.detach()
        zeros = (grad.numel() - torch.count_nonzero(grad)).float()
        total = zeros if total is None else total + zeros
    if total is None:
        total = torch.tensor(0.0, device="cuda" if torch.cuda.is_available() else "cpu")
    total = total.reshape(1).clone()
    _all_reduce(total, dist.ReduceOp.SUM, model_parallel_group)
    return total.item()
