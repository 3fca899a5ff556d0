"""FusedScaleMaskSoftmax on CPU: torch fallback vs a float64 reference, and the kernel-selection logic.

The kernel path is exercised here with a fake extension (torch ops recording their calls) so the
autograd wrappers, reshapes and dispatch are tested without a GPU; the real kernels are checked in
test_fused_kernels_gpu.py.
"""

import pytest
import torch

from megatron.core.fusions import fused_softmax
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax, softmax_kernel_supported
from megatron.core.transformer.enums import AttnMaskType


def mask_func(scores, mask):
    return scores.masked_fill(mask, -10000.0)


def reference(x, mask, scale):
    """float64 softmax(scale * x) with masked elements excluded and fully masked rows set to 0."""
    x = x.double() * (1.0 if scale is None else scale)
    if mask is None:
        return torch.softmax(x, dim=-1)
    mask = mask.expand_as(x)
    full = mask.all(dim=-1, keepdim=True)
    x = x.masked_fill(mask, float("-inf")).masked_fill(full, 0.0)
    return torch.softmax(x, dim=-1).masked_fill(full, 0.0)


def causal(sq, sk):
    return torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1 + sk - sq).view(1, 1, sq, sk)


def padding_mask(b, sq, sk, gen, broadcast):
    mask = torch.rand(1 if broadcast else b, 1, sq, sk, generator=gen) < 0.3
    mask[0, 0, 1, :] = True  # a fully masked row
    return mask


def make(dtype, mask_type, scale=None, fusion=True, softmax_in_fp32=True):
    return FusedScaleMaskSoftmax(dtype == torch.float16, dtype == torch.bfloat16, mask_type, fusion, mask_func,
                                 softmax_in_fp32, scale)


TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_fwd_bwd(module, x, mask, ref_mask, scale, dtype):
    gen = torch.Generator().manual_seed(1)
    x = x.to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    grad = torch.randn(x.shape, generator=gen)
    out = module(x, mask)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference(x64, ref_mask, scale)
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=4 * tol * max(1.0, scale or 1.0), rtol=4 * tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("broadcast", [True, False])
def test_padding_mask_fallback(dtype, broadcast):
    gen = torch.Generator().manual_seed(0)
    b, np_, sq, sk = 2, 3, 5, 7
    x = torch.randn(b, np_, sq, sk, generator=gen) * 3
    mask = padding_mask(b, sq, sk, gen, broadcast)
    out = check_fwd_bwd(make(dtype, AttnMaskType.padding, scale=0.5), x, mask, mask, 0.5, dtype)
    assert torch.all(out[0, :, 1] == 0)  # fully masked row -> exact zeros
    if not broadcast:
        assert torch.all(out[1].float().sum(-1) > 0.99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 8), (8, 5)])
def test_causal_fallback_builds_mask(dtype, sq, sk):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, sq, sk, generator=gen)
    out = check_fwd_bwd(make(dtype, AttnMaskType.causal, scale=2.0), x, None, causal(sq, sk), 2.0, dtype)
    assert torch.all(out.masked_select(causal(sq, sk).expand_as(out)) == 0)


def test_causal_with_explicit_mask_uses_that_mask():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 6, generator=gen)
    mask = causal(6, 6) | (torch.rand(1, 1, 6, 6, generator=gen) < 0.2)
    check_fwd_bwd(make(torch.float32, AttnMaskType.causal), x, mask, mask, None, torch.float32)


def test_no_mask_no_scale_half_softmax():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 4, 9, generator=gen)
    check_fwd_bwd(make(torch.bfloat16, AttnMaskType.padding, softmax_in_fp32=False), x, None, None, None,
                  torch.bfloat16)


def test_constructor_errors():
    with pytest.raises(ValueError, match="attention-softmax-in-fp32"):
        make(torch.float16, AttnMaskType.padding, scale=0.5, softmax_in_fp32=False)
    with pytest.raises(ValueError, match="mutually exclusive"):
        FusedScaleMaskSoftmax(True, True, AttnMaskType.padding, True, mask_func, True, None)
    with pytest.raises(ValueError, match=r"\[b, np, sq, sk\]"):
        make(torch.float32, AttnMaskType.padding)(torch.zeros(2, 3, 4), None)


def test_softmax_kernel_supported():
    assert softmax_kernel_supported(torch.float16, (2, 4, 128, 128), (2, 1, 128, 128))
    assert softmax_kernel_supported(torch.bfloat16, (1, 1, 3, 16384), (1, 1, 3, 16384))
    assert softmax_kernel_supported(torch.bfloat16, (2, 4, 7, 33), None)
    assert not softmax_kernel_supported(torch.float32, (2, 4, 128, 128), None)
    assert not softmax_kernel_supported(torch.float16, (1, 1, 2, 16385), None)
    assert not softmax_kernel_supported(torch.float16, (2, 4, 8, 8), (3, 1, 8, 8))
    assert not softmax_kernel_supported(torch.float16, (2, 4, 8, 8), (2, 4, 8, 8))
    assert not softmax_kernel_supported(torch.float16, (2, 4, 8, 8), (2, 1, 8, 4))


class FakeSoftmaxExt:
    """Stand-in for megatron_fused_kernels: the kernel contract in float32 torch ops, with a call log."""

    def __init__(self):
        self.calls = []

    def scaled_masked_softmax_forward(self, x, mask, scale):
        self.calls.append("masked_fwd")
        return reference(x, mask, scale).to(x.dtype)

    @staticmethod
    def _softmax_backward(g, y, scale):
        g, y = g.float(), y.float()
        return (scale * y * (g - (g * y).sum(-1, keepdim=True))).to(y.dtype)

    def scaled_masked_softmax_backward(self, g, y, scale):
        self.calls.append("masked_bwd")
        return self._softmax_backward(g, y, scale)

    def scaled_upper_triang_masked_softmax_forward(self, x, scale):
        self.calls.append("causal_fwd")
        assert x.dim() == 3
        return reference(x, causal(x.size(1), x.size(2))[0], scale).to(x.dtype)

    def scaled_upper_triang_masked_softmax_backward(self, g, y, scale):
        self.calls.append("causal_bwd")
        assert g.dim() == 3
        return self._softmax_backward(g, y, scale)


@pytest.fixture
def fake_kernels(monkeypatch):
    ext = FakeSoftmaxExt()
    monkeypatch.setattr(fused_softmax, "fused_kernels_available", lambda: True)
    monkeypatch.setattr(fused_softmax, "load_fused_kernels", lambda: ext)
    monkeypatch.setattr(fused_softmax, "_is_cuda", lambda t: True)
    return ext


@pytest.mark.parametrize("mask_type,with_mask,expected", [
    (AttnMaskType.causal, False, ["causal_fwd", "causal_bwd"]),
    (AttnMaskType.causal, True, ["masked_fwd", "masked_bwd"]),
    (AttnMaskType.padding, True, ["masked_fwd", "masked_bwd"]),
    (AttnMaskType.padding, False, ["masked_fwd", "masked_bwd"]),
])
def test_kernel_path_dispatch_and_autograd(fake_kernels, mask_type, with_mask, expected):
    gen = torch.Generator().manual_seed(5)
    b, np_, sq, sk = 2, 3, 6, 6
    x = torch.randn(b, np_, sq, sk, generator=gen)
    mask = padding_mask(b, sq, sk, gen, broadcast=False) if with_mask else None
    ref_mask = mask if with_mask else (causal(sq, sk) if mask_type == AttnMaskType.causal else None)
    check_fwd_bwd(make(torch.bfloat16, mask_type, scale=0.7), x, mask, ref_mask, 0.7, torch.bfloat16)
    assert fake_kernels.calls == expected


@pytest.mark.parametrize("case", ["fp32_input", "fusion_off", "too_long", "bad_mask_dtype", "on_cpu"])
def test_kernel_path_not_taken(fake_kernels, monkeypatch, case):
    dtype, fusion, sk = torch.float16, True, 8
    mask = None
    if case == "fp32_input":
        dtype = torch.float32
    elif case == "fusion_off":
        fusion = False
    elif case == "too_long":
        sk = fused_softmax.MAX_KERNEL_SK + 1
    elif case == "bad_mask_dtype":
        mask = torch.zeros(1, 1, 2, sk, dtype=torch.uint8)
    elif case == "on_cpu":
        monkeypatch.setattr(fused_softmax, "_is_cuda", lambda t: False)
    module = make(dtype, AttnMaskType.padding, fusion=fusion)
    x = torch.randn(1, 1, 2, sk).to(dtype)
    out = module(x, None if mask is None else mask.bool()) if case != "bad_mask_dtype" else None
    if case == "bad_mask_dtype":
        assert not module.is_kernel_available(mask, 1, 1, 2, sk)
    else:
        torch.testing.assert_close(out.double(), reference(x, None, None), atol=2e-3, rtol=2e-3)
    assert fake_kernels.calls == []


def test_no_kernel_without_extension(monkeypatch):
    monkeypatch.setattr(fused_softmax, "fused_kernels_available", lambda: False)
    assert not make(torch.float16, AttnMaskType.causal).is_kernel_available(None, 2, 2, 8, 8)
