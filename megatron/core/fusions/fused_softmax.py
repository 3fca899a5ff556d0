"""Scale + mask + softmax over attention scores, fused on CUDA, as Megatron-LM's FusedScaleMaskSoftmax.

Kernels (``megatron_fused_kernels``, csrc/fused/softmax.cu), fp16/bf16 in and out, fp32 math:

* ``scaled_upper_triang_masked_softmax``: causal, input [b*np, sq, sk]; element (i, j) is masked
  when ``j > i + (sk - sq)``; reads only the unmasked part.
* ``scaled_masked_softmax``: input [b, np, sq, sk] with an optional bool mask [b|1, 1, sq, sk]
  (True = masked out).

Rows whose every element is masked give probabilities 0 (and gradient 0), in the kernels and in the
torch fallback alike. Row length sk must be 1..MAX_KERNEL_SK; anything else falls back to torch.

Difference from Megatron-LM: with ``AttnMaskType.causal`` Megatron's fused path ignores the mask it
is given. Here the causal kernel is used only when ``mask is None``; a causal layer that passes a
mask gets the masked kernel with that mask, so the fused and fallback paths always agree.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from megatron.core.fusions import fused_kernels_available, load_fused_kernels
from megatron.core.transformer.enums import AttnMaskType

MAX_KERNEL_SK = 16384  # longest row the register-resident kernels hold (csrc/fused/softmax.cu)


def softmax_kernel_supported(dtype: torch.dtype, shape, mask_shape=None) -> bool:
    """Whether the CUDA softmax kernels accept this input (dtype and sizes only, no device check).

    Args:
        dtype: input dtype (fp16/bf16 only).
        shape: input shape [b, np, sq, sk].
        mask_shape: mask shape, None or [b|1, 1, sq, sk].
    """
    if dtype not in (torch.float16, torch.bfloat16) or len(shape) != 4:
        return False
    b, np_, sq, sk = shape
    if min(b, np_, sq, sk) < 1 or sk > MAX_KERNEL_SK:
        return False
    if mask_shape is not None:
        mask_shape = tuple(mask_shape)
        if len(mask_shape) != 4 or mask_shape[0] not in (1, b) or mask_shape[1:] != (1, sq, sk):
            return False
    return True


class ScaledUpperTriangMaskedSoftmax(torch.autograd.Function):
    """Causal softmax(scale * x) on [attn_batches, sq, sk] with the CUDA kernel."""

    @staticmethod
    def forward(ctx, inputs, scale):
        ext = load_fused_kernels()
        out = ext.scaled_upper_triang_masked_softmax_forward(inputs.contiguous(), scale)
        ctx.scale = scale
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        ext = load_fused_kernels()
        grad_in = ext.scaled_upper_triang_masked_softmax_backward(grad_out.contiguous(), out, ctx.scale)
        return grad_in, None


class ScaledMaskedSoftmax(torch.autograd.Function):
    """softmax(scale * x) over the last dim of [b, np, sq, sk], masked by bool [b|1, 1, sq, sk] or None."""

    @staticmethod
    def forward(ctx, inputs, mask, scale):
        ext = load_fused_kernels()
        mask = None if mask is None else mask.contiguous()
        out = ext.scaled_masked_softmax_forward(inputs.contiguous(), mask, scale)
        ctx.scale = scale
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        ext = load_fused_kernels()
        grad_in = ext.scaled_masked_softmax_backward(grad_out.contiguous(), out, ctx.scale)
        return grad_in, None, None


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """Bool [1, 1, sq, sk], True where key j lies after query i (j > i + sk - sq)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return (j > i + (sk - sq)).view(1, 1, sq, sk)


class FusedScaleMaskSoftmax(nn.Module):
    """Fused operation: scaling + mask + softmax.

    Args:
        input_in_fp16: the input is fp16.
        input_in_bf16: the input is bf16.
        attn_mask_type: AttnMaskType.causal or AttnMaskType.padding.
        scaled_masked_softmax_fusion: use the CUDA kernel when possible (``--no-masked-softmax-fusion``
            turns it off).
        mask_func: ``mask_func(scores, mask) -> masked scores`` used by the torch path
            (e.g. ``scores.masked_fill(mask, -10000.0)``).
        softmax_in_fp32: do the torch-path softmax in fp32 (the kernel always computes in fp32).
        scale: multiply the scores by this before the softmax (None = 1). Needs softmax_in_fp32.
    """

    def __init__(self, input_in_fp16: bool, input_in_bf16: bool, attn_mask_type: AttnMaskType,
                 scaled_masked_softmax_fusion: bool, mask_func: Callable, softmax_in_fp32: bool,
                 scale: Optional[float]):
        super().__init__()
        if input_in_fp16 and input_in_bf16:
            raise ValueError("FusedScaleMaskSoftmax: input_in_fp16 and input_in_bf16 are mutually exclusive")
        if scale is not None and not softmax_in_fp32:
            raise ValueError("FusedScaleMaskSoftmax: a softmax scale needs softmax_in_fp32=True "
                             "(--attention-softmax-in-fp32)")
        self.input_in_fp16 = input_in_fp16
        self.input_in_bf16 = input_in_bf16
        self.input_in_float16 = input_in_fp16 or input_in_bf16
        self.attn_mask_type = attn_mask_type
        self.scaled_masked_softmax_fusion = scaled_masked_softmax_fusion
        self.mask_func = mask_func
        self.softmax_in_fp32 = softmax_in_fp32
        self.scale = scale

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """input: [b, np, sq, sk] scores; mask: bool [b|1, 1, sq, sk] (True = masked out) or None."""
        if input.dim() != 4:
            raise ValueError(f"FusedScaleMaskSoftmax expects [b, np, sq, sk] scores, got {tuple(input.shape)}")
        if self.is_kernel_available(mask, *input.size()) and _is_cuda(input):
            return self.forward_fused_softmax(input, mask)
        return self.forward_torch_softmax(input, mask)

    def is_kernel_available(self, mask: Optional[torch.Tensor], b: int, np: int, sq: int, sk: int) -> bool:
        """Whether the CUDA kernel will be used for these sizes (device checked in forward)."""
        if not (self.scaled_masked_softmax_fusion and self.input_in_float16 and fused_kernels_available()):
            return False
        dtype = torch.float16 if self.input_in_fp16 else torch.bfloat16
        mask_shape = None if mask is None else mask.shape
        if mask is not None and mask.dtype != torch.bool:
            return False
        return softmax_kernel_supported(dtype, (b, np, sq, sk), mask_shape)

    def forward_fused_softmax(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, np, sq, sk = input.size()
        scale = 1.0 if self.scale is None else float(self.scale)
        if self.attn_mask_type == AttnMaskType.causal and mask is None:
            probs = ScaledUpperTriangMaskedSoftmax.apply(input.reshape(b * np, sq, sk), scale)
            return probs.view(b, np, sq, sk)
        return ScaledMaskedSoftmax.apply(input, mask, scale)

    def forward_torch_softmax(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.input_in_float16 and self.softmax_in_fp32:
            input = input.float()
        if self.scale is not None:
            input = input * self.scale
        if self.attn_mask_type == AttnMaskType.causal and mask is None:
            mask = causal_mask(input.size(2), input.size(3), device=input.device)
        masked = self.mask_func(input, mask) if mask is not None else input
        probs = torch.softmax(masked, dim=-1)
        if mask is not None:
            fully_masked = mask.all(dim=-1, keepdim=True)  # [b|1, 1, sq, 1]
            probs = probs.masked_fill(fully_masked, 0.0)
        if self.input_in_float16 and self.softmax_in_fp32:
            probs = probs.half() if self.input_in_fp16 else probs.bfloat16()
        return probs

    @staticmethod
    def get_batch_per_block(sq: int, sk: int, b: int, np: int) -> int:
        """Megatron-LM API compatibility: rows of one (b, np) slice handled per CUDA block (always 1 here)."""
        return 1
