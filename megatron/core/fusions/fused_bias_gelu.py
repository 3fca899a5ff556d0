"""Bias + GeLU (tanh approximation) with a hand-written backward, as Megatron-LM's fused_bias_gelu.

No hand CUDA here: the op is elementwise, so a generated kernel (torch.compile / inductor, one read
of the input, one broadcast read of the bias, one write) is already at memory bandwidth. On CUDA the
forward and backward bodies are compiled with torch.compile (once, on first use); on CPU, or when
compilation fails or is disabled (``set_compile_enabled(False)``, ``--no-bias-gelu-fusion``), they
run eagerly. ``benchmarks/bench_fused_kernels.py`` measures eager vs compiled.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

_COMPILE = os.environ.get("MEGATRON_NO_TORCH_COMPILE", "0") != "1"
_compiled = {}


def compile_enabled() -> bool:
    """Whether elementwise fusions may use torch.compile on CUDA."""
    return _COMPILE


def set_compile_enabled(enabled: bool) -> None:
    """Switch torch.compile for the elementwise fusions on or off (process-wide)."""
    global _COMPILE
    _COMPILE = bool(enabled)


def maybe_compiled(fn, t: torch.Tensor):
    """Return torch.compile(fn) for CUDA tensors when enabled, else fn (falls back on compile errors)."""
    if not (_COMPILE and t.is_cuda):
        return fn
    entry = _compiled.get(fn)
    if entry is None:
        entry = _compiled[fn] = torch.compile(fn, dynamic=None)

    def run(*args):
        global _COMPILE
        try:
            return entry(*args)
        except Exception as exc:  # a broken inductor/triton install must not stop training
            logger.warning("torch.compile of %s failed (%s); using eager torch", fn.__name__, exc)
            _COMPILE = False
            return fn(*args)

    return run


def bias_gelu(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tanh-GeLU(y + bias) (Hendrycks & Gimpel), computed in the input dtype."""
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def bias_gelu_back(g: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of tanh-GeLU at x = y + bias, times g. 0.1070322243 = 3 * 0.044715 * 0.79788456."""
    x = bias + y
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
    return ff * g


class GeLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves only the input and bias, recomputes tanh in backward."""

    @staticmethod
    def forward(ctx, input, bias):
        ctx.save_for_backward(input, bias)
        return maybe_compiled(bias_gelu, input)(bias, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        tmp = maybe_compiled(bias_gelu_back, input)(grad_output, bias, input)
        grad_bias = tmp.reshape(-1, bias.numel()).sum(dim=0).reshape(bias.shape)
        return tmp, grad_bias


def bias_gelu_impl(input: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """tanh-GeLU(input + bias) with autograd.

    Args:
        input: [..., h] activations (e.g. [s, b, 4h/tp] from dense_h_to_4h with skip_bias_add).
        bias: [h].

    Returns:
        Tensor shaped like input.
    """
    return GeLUFunction.apply(input, bias)
