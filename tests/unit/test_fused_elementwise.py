"""bias_gelu_impl and get_bias_dropout_add vs float64 references; the fusion status line."""

import logging

import pytest
import torch

from megatron.core import fusions
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_bias_gelu_matches_float64_tanh_gelu(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 16, generator=gen) * 3).to(dtype).requires_grad_(True)  # [s, b, 4h]
    b = torch.randn(16, generator=gen).to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    out = bias_gelu_impl(x, b)
    ref = torch.nn.functional.gelu(x64 + b64, approximate="tanh")
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    assert out.dtype == dtype and b.grad.shape == (16,)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=tol * 2, rtol=tol * 2)
    torch.testing.assert_close(b.grad.double(), b64.grad, atol=tol * 12, rtol=tol * 2)


@pytest.mark.parametrize("fused", [False, True])
def test_bias_dropout_add_inference_is_exact(fused):
    gen = torch.Generator().manual_seed(1)
    x, r, b = (torch.randn(3, 2, 8, generator=gen) for _ in range(3))
    fn = get_bias_dropout_add(training=False, fused=fused)
    torch.testing.assert_close(fn(x, b[0, 0], r, 0.5), (x.double() + b[0, 0].double() + r.double()).float())
    torch.testing.assert_close(fn(x, None, r, 0.5), x + r)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_dropout_add_training(with_bias):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, 32, generator=gen).requires_grad_(True)
    r = torch.randn(64, 4, 32, generator=gen)
    b = torch.randn(32, generator=gen) if with_bias else None
    p = 0.25
    torch.manual_seed(3)
    out = get_bias_dropout_add(training=True, fused=True)(x, b, r, p)
    torch.manual_seed(3)
    out_unfused = get_bias_dropout_add(training=True, fused=False)(x, b, r, p)
    torch.testing.assert_close(out, out_unfused)  # same RNG stream on CPU (eager in both)
    pre = (x + b if with_bias else x).detach().double()
    kept = (out.detach().double() - r.double())
    dropped = kept == 0
    assert abs(dropped.double().mean().item() - p) < 0.02
    torch.testing.assert_close(kept[~dropped], (pre / (1 - p))[~dropped], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / (1 - p))


def test_log_fusion_status(caplog, monkeypatch):
    logger = logging.getLogger("fusion-test")
    with caplog.at_level(logging.INFO, logger="fusion-test"):
        line = fusions.log_fusion_status(logger, masked_softmax_fusion=True)
    assert caplog.records[-1].getMessage() == line
    expected = "cuda kernel" if fusions.fused_kernels_available() else "torch"
    assert f"softmax={expected}" in line and f"layer_norm={expected}" in line
    monkeypatch.setattr(fusions, "fused_kernels_available", lambda: True)
    status = fusions.fusion_status(masked_softmax_fusion=False)
    assert status["softmax"] == "torch" and status["layer_norm"] == "cuda kernel"
    assert "kernels_unavailable" not in status
