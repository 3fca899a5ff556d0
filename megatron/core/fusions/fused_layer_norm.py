"""Layer norm with fp32 statistics, fused on CUDA, as Megatron-LM's FusedLayerNorm.

Kernel (``megatron_fused_kernels``, csrc/fused/layer_norm.cu): input fp32/fp16/bf16, weight and bias in
the input dtype or fp32, mean/rstd and the weight/bias gradient reduction in fp32, any hidden size
1..MAX_KERNEL_HIDDEN. Otherwise (no extension, CPU, larger hidden) torch.nn.functional.layer_norm.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from megatron.core.fusions import fused_kernels_available, load_fused_kernels

MAX_KERNEL_HIDDEN = 16384  # csrc/fused/layer_norm.cu keeps one row in registers
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm_kernel_supported(input_dtype: torch.dtype, weight_dtype: torch.dtype, hidden: int) -> bool:
    """Whether the CUDA layer norm accepts these dtypes and hidden size (no device check)."""
    if input_dtype not in _FLOATS or weight_dtype not in (input_dtype, torch.float32):
        return False
    return 1 <= hidden <= MAX_KERNEL_HIDDEN


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


class FusedLayerNormAffineFunction(torch.autograd.Function):
    """y = (x - mean) * rstd * w' + b over the last dim, w' = w (+1 with zero_centered_gamma)."""

    @staticmethod
    def forward(ctx, input, weight, bias, eps, zero_centered_gamma):
        ext = load_fused_kernels()
        hidden = weight.numel()
        x2d = input.contiguous().view(-1, hidden)  # [rows, h]
        out, mean, rstd = ext.layer_norm_forward(x2d, weight.contiguous(), bias.contiguous(), eps,
                                                 zero_centered_gamma)
        ctx.zero_centered_gamma = zero_centered_gamma
        ctx.save_for_backward(x2d, weight, mean, rstd)
        return out.view(input.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, mean, rstd = ctx.saved_tensors
        ext = load_fused_kernels()
        g2d = grad_out.contiguous().view(x2d.shape)
        grad_in, grad_w, grad_b = ext.layer_norm_backward(g2d, x2d, mean, rstd, weight.contiguous(),
                                                          ctx.zero_centered_gamma)
        return grad_in.view(grad_out.shape), grad_w, grad_b, None, None


class FusedLayerNorm(nn.Module):
    """Layer norm over the last dim with learnable ``weight`` and ``bias`` (checkpoint key names).

    Args:
        hidden_size: normalized size (int or 1-element shape).
        eps: added to the variance.
        persist_layer_norm: accepted for Megatron-LM compatibility (``--no-persist-layer-norm``);
            one kernel serves every hidden size here, so it does not change the implementation.
        sequence_parallel: mark both params ``sequence_parallel`` so their grads get all-reduced
            over the tensor-parallel group.
        params_dtype: dtype of weight and bias.
        zero_centered_gamma: store gamma - 1 (weight initialised to 0, applied as 1 + weight).
    """

    def __init__(self, hidden_size, eps: float = 1e-5, persist_layer_norm: bool = True,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 zero_centered_gamma: bool = False):
        super().__init__()
        if not isinstance(hidden_size, numbers.Integral):
            hidden_size = tuple(hidden_size)
            if len(hidden_size) != 1:
                raise ValueError(f"FusedLayerNorm normalizes the last dim only; got shape {hidden_size}")
            hidden_size = hidden_size[0]
        self.hidden_size = int(hidden_size)
        self.eps = eps
        self.persist_layer_norm = persist_layer_norm
        self.sequence_parallel = sequence_parallel
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = nn.Parameter(torch.empty(self.hidden_size, dtype=params_dtype))
        self.bias = nn.Parameter(torch.empty(self.hidden_size, dtype=params_dtype))
        self.reset_parameters()
        self.weight.sequence_parallel = bool(sequence_parallel)
        self.bias.sequence_parallel = bool(sequence_parallel)

    def reset_parameters(self) -> None:
        if self.zero_centered_gamma:
            nn.init.zeros_(self.weight)
        else:
            nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def use_kernel(self, input: torch.Tensor) -> bool:
        """Whether forward(input) runs the CUDA kernel."""
        return (_is_cuda(input) and fused_kernels_available()
                and layer_norm_kernel_supported(input.dtype, self.weight.dtype, self.hidden_size))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: [..., h] (e.g. [s, b, h]); returns the same shape and dtype."""
        if input.size(-1) != self.hidden_size:
            raise ValueError(f"FusedLayerNorm(hidden_size={self.hidden_size}) got input {tuple(input.shape)}")
        if self.use_kernel(input):
            return FusedLayerNormAffineFunction.apply(input, self.weight, self.bias, self.eps,
                                                      self.zero_centered_gamma)
        return self.forward_torch(input)

    def forward_torch(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        shape = (self.hidden_size,)
        if weight.dtype == input.dtype:
            return nn.functional.layer_norm(input, shape, weight, self.bias, self.eps)
        out = nn.functional.layer_norm(input.float(), shape, weight.float(), self.bias.float(), self.eps)
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"
