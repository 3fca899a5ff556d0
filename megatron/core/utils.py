"""Small helpers shared across megatron.core (weight-init factories, as in megatron.core.utils)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch


def init_method_normal(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Init method filling a tensor in place from N(0, sigma) (picklable)."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=sigma)


def scaled_init_method_normal(sigma: float, num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Init method filling a tensor from N(0, sigma / sqrt(2 * num_layers)) (output projections)."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=sigma / math.sqrt(2.0 * num_layers))
