"""FusedLayerNorm on CPU: torch fallback vs a float64 reference, params/attributes, kernel selection."""

import pytest
import torch

from megatron.core.fusions import fused_layer_norm
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm, layer_norm_kernel_supported


def reference(x, weight, bias, eps, zero_centered):
    """float64 layer norm written out (no torch layer_norm)."""
    x = x.double()
    w = weight.double() + (1.0 if zero_centered else 0.0)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + bias.double()


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(ln, x, dtype):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial params
        ln.weight.copy_(torch.randn(ln.hidden_size, generator=gen) * 0.5 + (0.0 if ln.zero_centered_gamma else 1))
        ln.bias.copy_(torch.randn(ln.hidden_size, generator=gen) * 0.1)
    x = x.to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w64 = ln.weight.detach().double().requires_grad_(True)
    b64 = ln.bias.detach().double().requires_grad_(True)
    out = ln(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference(x64, w64, b64, ln.eps, ln.zero_centered_gamma)
    grad = torch.randn(x.shape, generator=gen).to(dtype)  # both sides see the same rounded grad
    out.backward(grad)
    ref.backward(grad.double())
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=tol * 8, rtol=tol * 4)
    rows = x.numel() // ln.hidden_size
    ptol = tol * 4 * rows ** 0.5
    torch.testing.assert_close(ln.weight.grad.double(), w64.grad, atol=ptol, rtol=tol * 4)
    torch.testing.assert_close(ln.bias.grad.double(), b64.grad, atol=ptol, rtol=tol * 4)


@pytest.mark.parametrize("dtype,params_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_fallback_matches_reference(dtype, params_dtype, zero_centered):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 37, generator=gen) * 2 + 1  # [s, b, h], odd hidden, non-zero mean
    ln = FusedLayerNorm(37, eps=1e-5, params_dtype=params_dtype, zero_centered_gamma=zero_centered)
    check(ln, x, dtype)


def test_params_names_init_and_attributes():
    ln = FusedLayerNorm(16, sequence_parallel=True, params_dtype=torch.bfloat16)
    assert list(ln.state_dict()) == ["weight", "bias"]
    assert ln.weight.dtype == torch.bfloat16 and torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert ln.weight.sequence_parallel is True and ln.bias.sequence_parallel is True
    assert FusedLayerNorm(16).weight.sequence_parallel is False
    zc = FusedLayerNorm([16], zero_centered_gamma=True)
    assert torch.all(zc.weight == 0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(zc(x), torch.nn.functional.layer_norm(x, (16,)))


def test_errors():
    with pytest.raises(ValueError, match="last dim"):
        FusedLayerNorm((4, 4))
    with pytest.raises(ValueError, match="hidden_size=8"):
        FusedLayerNorm(8)(torch.zeros(2, 9))


def test_kernel_supported():
    assert layer_norm_kernel_supported(torch.bfloat16, torch.float32, 4096)
    assert layer_norm_kernel_supported(torch.float16, torch.float16, 1)
    assert layer_norm_kernel_supported(torch.float32, torch.float32, 16384)
    assert not layer_norm_kernel_supported(torch.float32, torch.float32, 16385)
    assert not layer_norm_kernel_supported(torch.float32, torch.bfloat16, 1024)
    assert not layer_norm_kernel_supported(torch.float64, torch.float64, 1024)


class FakeLayerNormExt:
    """The kernel contract (fp32 stats, [rows, h] in, grads in weight dtype) in torch ops, with a call log."""

    def __init__(self):
        self.calls = []

    def layer_norm_forward(self, x, w, b, eps, zero_centered):
        self.calls.append("fwd")
        assert x.dim() == 2
        xf = x.float()
        mean = xf.mean(-1)
        rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
        y = (xf - mean[:, None]) * rstd[:, None] * (w.float() + float(zero_centered)) + b.float()
        return y.to(x.dtype), mean, rstd

    def layer_norm_backward(self, g, x, mean, rstd, w, zero_centered):
        self.calls.append("bwd")
        g, xf = g.float(), x.float()
        xhat = (xf - mean[:, None]) * rstd[:, None]
        gw = g * (w.float() + float(zero_centered))
        dx = rstd[:, None] * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), (g * xhat).sum(0).to(w.dtype), g.sum(0).to(w.dtype)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_kernel_path_autograd_wrapper(monkeypatch, zero_centered):
    ext = FakeLayerNormExt()
    monkeypatch.setattr(fused_layer_norm, "fused_kernels_available", lambda: True)
    monkeypatch.setattr(fused_layer_norm, "load_fused_kernels", lambda: ext)
    monkeypatch.setattr(fused_layer_norm, "_is_cuda", lambda t: True)
    ln = FusedLayerNorm(24, zero_centered_gamma=zero_centered)
    x = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(1))
    check(ln, x, torch.bfloat16)
    assert ext.calls == ["fwd", "bwd"]
    ext.calls.clear()
    big = FusedLayerNorm(fused_layer_norm.MAX_KERNEL_HIDDEN + 1)
    assert not big.use_kernel(torch.zeros(1, big.hidden_size))
    monkeypatch.setattr(fused_layer_norm, "_is_cuda", lambda t: False)
    assert not ln.use_kernel(x) and ext.calls == []
