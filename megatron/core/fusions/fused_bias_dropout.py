"""Bias + dropout + residual add, as Megatron-LM's get_bias_dropout_add.

Elementwise, so no hand CUDA: with ``fused=True`` on CUDA the function body is compiled with
torch.compile (one kernel; the dropout mask comes from the current torch CUDA generator, so the
tensor-parallel RNG tracker's fork still controls it); otherwise it runs eagerly.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.core.fusions.fused_bias_gelu import maybe_compiled


def bias_dropout_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, prob: float,
                     training: bool) -> torch.Tensor:
    """residual + dropout(x + bias). x, residual: [s, b, h]; bias: [h] or None."""
    if bias is not None:
        x = x + bias
    out = torch.nn.functional.dropout(x, p=prob, training=training)
    return residual + out


def _bda_train(x, bias, residual, prob):
    return bias_dropout_add(x, bias, residual, prob, True)


def _bda_infer(x, bias, residual, prob):
    return bias_dropout_add(x, bias, residual, prob, False)


def get_bias_dropout_add(training: bool, fused: bool) -> Callable:
    """Return ``fn(x, bias, residual, prob) -> residual + dropout(x + bias)``.

    Args:
        training: apply dropout (False: identity dropout).
        fused: compile the body with torch.compile when the tensors are on CUDA.
    """
    base = _bda_train if training else _bda_infer
    if not fused:
        return base

    def fused_fn(x, bias, residual, prob):
        return maybe_compiled(base, x)(x, bias, residual, prob)

    return fused_fn
