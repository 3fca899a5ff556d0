"""OptimizerConfig: everything the optimizer, loss scaler and grad clipping need, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class OptimizerConfig:
    """Optimizer settings (megatron-core names; the flags are `--optimizer`, `--lr`, ...).

    Attributes:
        optimizer: 'adam' (decoupled weight decay, i.e. AdamW, as Megatron's fused Adam) or 'sgd'.
        lr: peak learning rate (the param scheduler overwrites the groups' lr every step).
        min_lr: floor of the learning-rate decay.
        weight_decay: L2 / decoupled weight decay of weight matrices (biases and norms get none).
        adam_beta1, adam_beta2, adam_eps: Adam coefficients.
        sgd_momentum: SGD momentum.
        fp16: fp16 model params with fp32 master copies and a loss scaler.
        bf16: bf16 model params with fp32 master copies (no loss scaler unless `loss_scale` is set).
        params_dtype: dtype of the model params.
        loss_scale: constant loss scale; None means dynamic loss scaling (fp16).
        initial_loss_scale: first scale of the dynamic scaler.
        min_loss_scale: the dynamic scale never drops below this.
        loss_scale_window: steps without overflow before the dynamic scale doubles.
        hysteresis: overflows tolerated before the dynamic scale is halved.
        clip_grad: clip the global grad L2 norm to this value (0 disables clipping).
        log_num_zeros_in_grad: count zero entries of the grads every step.
    """

    optimizer: str = "adam"
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-08
    sgd_momentum: float = 0.9
    fp16: bool = False
    bf16: bool = False
    params_dtype: torch.dtype = torch.float32
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2
    clip_grad: float = 1.0
    log_num_zeros_in_grad: bool = False

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer {self.optimizer!r} is not supported; use 'adam' or 'sgd'")
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 are mutually exclusive; pick one")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ValueError(f"--loss-scale must be > 0 (got {self.loss_scale}); omit it for dynamic scaling")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (got {self.clip_grad}); 0 disables clipping")
