"""Optimizers: fp32 / fp16 / bf16 Megatron optimizers, loss scalers, grad clipping, lr/wd scheduler.

Entry point: :func:`get_megatron_optimizer` builds AdamW or SGD over the model chunks with Megatron's
param groups (no weight decay on biases and 1-D params such as norms) wrapped in the right
:class:`MegatronOptimizer`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron.core.optimizer.clip_grads import (
    clip_grad_by_total_norm_fp32,
    count_zeros_fp32,
    get_grad_norm_fp32,
    param_is_not_shared,
    param_is_not_tensor_parallel_duplicate,
)
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from megatron.core.optimizer.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
    MixedPrecisionOptimizer,
)
from megatron.core.optimizer.optimizer_config import OptimizerConfig
from megatron.core.optimizer.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = [
    "OptimizerConfig", "MegatronOptimizer", "MixedPrecisionOptimizer", "Float16OptimizerWithFloat16Params",
    "FP32Optimizer", "MegatronGradScaler", "ConstantGradScaler", "DynamicGradScaler",
    "OptimizerParamScheduler", "get_megatron_optimizer", "get_grad_norm_fp32",
    "clip_grad_by_total_norm_fp32", "count_zeros_fp32", "param_is_not_shared",
    "param_is_not_tensor_parallel_duplicate",
]


def _get_param_groups(model_chunks: List[torch.nn.Module], no_weight_decay_cond: Optional[Callable],
                      scale_lr_cond: Optional[Callable], lr_mult: float) -> List[Dict]:
    """Megatron's param groups keyed by (wd_mult, lr_mult): biases and 1-D params get wd_mult 0."""
    params_map: Dict[Tuple[float, float], List[torch.nn.Parameter]] = {}
    seen = set()
    for model_chunk in model_chunks:
        for name, param in model_chunk.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if no_weight_decay_cond is not None:
                no_wd = no_weight_decay_cond(name, param)
            else:
                no_wd = name.endswith(".bias") or len(param.shape) == 1
            scale_lr = scale_lr_cond(name, param) if scale_lr_cond is not None else False
            key = (0.0 if no_wd else 1.0, lr_mult if scale_lr else 1.0)
            params_map.setdefault(key, []).append(param)
    return [{"params": params, "wd_mult": wd_mult, "lr_mult": group_lr_mult}
            for (wd_mult, group_lr_mult), params in params_map.items()]


def get_megatron_optimizer(config: OptimizerConfig, model_chunks, no_weight_decay_cond: Optional[Callable] = None,
                           scale_lr_cond: Optional[Callable] = None, lr_mult: float = 1.0) -> MegatronOptimizer:
    """Build the optimizer for ``model_chunks`` (a module or list of modules, DDP-wrapped or not).

    Args:
        config: optimizer settings.
        model_chunks: the model (chunks) whose trainable params are optimized.
        no_weight_decay_cond: ``f(name, param) -> bool``; default: biases and 1-D params.
        scale_lr_cond: ``f(name, param) -> bool`` selecting params whose lr is multiplied by ``lr_mult``.
        lr_mult: lr multiplier for params selected by ``scale_lr_cond``.

    Returns:
        :class:`FP32Optimizer` or, with fp16/bf16, :class:`Float16OptimizerWithFloat16Params` (fp16 gets
        a dynamic scaler unless ``config.loss_scale`` is set; bf16 gets none unless it is set).
        Every param group carries ``lr``, ``weight_decay`` (= weight_decay * wd_mult), ``wd_mult``
        and ``lr_mult``, which :class:`OptimizerParamScheduler` updates.
    """
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    if config.lr is None:
        raise ValueError("OptimizerConfig.lr is not set; pass --lr")
    param_groups = _get_param_groups(model_chunks, no_weight_decay_cond, scale_lr_cond, lr_mult)
    if not param_groups:
        raise ValueError("the model has no trainable parameters to optimize")
    for group in param_groups:
        group["lr"] = config.lr * group["lr_mult"]
        group["weight_decay"] = config.weight_decay * group["wd_mult"]

    if config.optimizer == "adam":
        optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay,
                                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    else:
        optimizer = torch.optim.SGD(param_groups, lr=config.lr, weight_decay=config.weight_decay,
                                    momentum=config.sgd_momentum)

    if config.fp16 or config.bf16:
        grad_scaler = None
        if config.loss_scale:
            grad_scaler = ConstantGradScaler(config.loss_scale)
        elif config.fp16:
            grad_scaler = DynamicGradScaler(initial_scale=config.initial_loss_scale,
                                            min_scale=config.min_loss_scale, growth_factor=2.0,
                                            backoff_factor=0.5, growth_interval=config.loss_scale_window,
                                            hysteresis=config.hysteresis)
        return Float16OptimizerWithFloat16Params(optimizer, config, grad_scaler)
    return FP32Optimizer(optimizer, config)
