"""The compiled CUDA kernels vs float64 references over a sweep of shapes and dtypes (needs a GPU).

Skipped without CUDA or without the built extension (``pip install -e . --no-build-isolation`` with a
CUDA torch and nvcc). Outputs are checked element by element; before each call the allocator's block
for the output is poisoned with NaN, so an element the kernel never writes shows up as NaN.
"""

import pytest
import torch

from megatron.core.fusions import fused_kernels_available, load_fused_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not fused_kernels_available(),
                       reason="megatron_fused_kernels not built"),
]

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def poison(shape, dtype):
    """Fill the caching allocator's next block of this size with NaN (a best-effort unwritten check)."""
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del t


def ref_softmax(x, mask, scale):
    x = x.double() * scale
    if mask is None:
        return torch.softmax(x, -1)
    mask = mask.expand_as(x)
    full = mask.all(-1, keepdim=True)
    x = x.masked_fill(mask, float("-inf")).masked_fill(full, 0.0)
    return torch.softmax(x, -1).masked_fill(full, 0.0)


def assert_close_rel(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in output (element not written?)"
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-12
    assert err <= TOL[dtype] * max(scale, 1e-2) * 4, f"{what}: max abs err {err:.3e} (ref max {scale:.3e})"


SOFTMAX_SHAPES = [  # b, np, sq, sk: vectorised and scalar rows, every row-config, sk up to 16384
    (1, 1, 1, 1), (2, 3, 5, 7), (2, 2, 4, 16), (1, 4, 33, 33), (2, 1, 8, 128), (1, 2, 16, 1000),
    (1, 2, 8, 2048), (1, 1, 4, 4097), (1, 1, 4, 8192), (1, 1, 2, 12000), (1, 1, 2, 16384), (1, 1, 2, 16383),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "broadcast", "per_batch"])
def test_scaled_masked_softmax(dtype, shape, mask_kind):
    ext = load_fused_kernels()
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, np_, sq, sk = shape
    x = (torch.randn(shape, generator=gen, device="cuda") * 4).to(dtype)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(1 if mask_kind == "broadcast" else b, 1, sq, sk, generator=gen, device="cuda") < 0.4
        mask[..., 0, :] = True  # fully masked rows
    scale = 0.37
    poison(shape, dtype)
    y = ext.scaled_masked_softmax_forward(x, mask, scale)
    ref = ref_softmax(x, mask, scale)
    assert_close_rel(y, ref, dtype, "forward")
    if mask is not None:
        assert torch.all(y[:, :, 0] == 0)
    g = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    poison(shape, dtype)
    dx = ext.scaled_masked_softmax_backward(g, y, scale)
    y64 = y.double()
    ref_dx = scale * y64 * (g.double() - (g.double() * y64).sum(-1, keepdim=True))
    assert_close_rel(dx, ref_dx, dtype, "backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bnp,sq,sk", [(1, 1, 1), (3, 17, 17), (4, 128, 128), (2, 1000, 1000), (1, 2048, 2048),
                                       (1, 7, 64), (1, 64, 8), (1, 16, 16384)])
def test_scaled_upper_triang_masked_softmax(dtype, bnp, sq, sk):
    ext = load_fused_kernels()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(bnp, sq, sk, generator=gen, device="cuda") * 4).to(dtype)
    causal = torch.triu(torch.ones(sq, sk, dtype=torch.bool, device="cuda"), diagonal=1 + sk - sq)
    poison(x.shape, dtype)
    y = ext.scaled_upper_triang_masked_softmax_forward(x, 0.5)
    ref = ref_softmax(x, causal, 0.5)
    assert_close_rel(y, ref, dtype, "forward")
    assert torch.all(y.masked_select(causal.expand_as(y)) == 0)
    g = torch.randn(x.shape, generator=gen, device="cuda").to(dtype)
    poison(x.shape, dtype)
    dx = ext.scaled_upper_triang_masked_softmax_backward(g, y, 0.5)
    y64 = y.double()
    ref_dx = 0.5 * y64 * (g.double() - (g.double() * y64).sum(-1, keepdim=True))
    assert_close_rel(dx, ref_dx, dtype, "backward")


def ref_layer_norm(x, w, b, eps, zc):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    return (x - mean) * rstd * (w.double() + zc) + b.double(), mean.squeeze(-1), rstd.squeeze(-1)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 7), (64, 256), (1000, 1024), (37, 1023), (256, 4096),
                                         (33, 5120), (64, 8192), (8, 12288), (4, 16384), (5, 16383),
                                         (8192, 2048)])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_layer_norm(dtype, wdtype, rows, hidden, zero_centered):
    ext = load_fused_kernels()
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = (torch.randn(rows, hidden, generator=gen, device="cuda") * 3 + 1).to(dtype)
    w = (torch.randn(hidden, generator=gen, device="cuda") * 0.5 + (0 if zero_centered else 1)).to(wdtype)
    b = (torch.randn(hidden, generator=gen, device="cuda") * 0.1).to(wdtype)
    poison((rows, hidden), dtype)
    y, mean, rstd = ext.layer_norm_forward(x, w, b, 1e-5, zero_centered)
    ref, ref_mean, ref_rstd = ref_layer_norm(x, w, b, 1e-5, float(zero_centered))
    assert_close_rel(y, ref, dtype, "forward")
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), ref_rstd, atol=1e-5, rtol=1e-4)
    g = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True)
    ref_layer_norm(x64, w64, b64, 1e-5, float(zero_centered))[0].backward(g.double())
    poison((rows, hidden), dtype)
    dx, dw, db = ext.layer_norm_backward(g, x, mean, rstd, w, zero_centered)
    assert dw.dtype == wdtype and db.dtype == wdtype
    assert_close_rel(dx, x64.grad, dtype, "grad_input")
    assert_close_rel(dw, w64.grad, wdtype if rows < 64 else torch.bfloat16, "grad_weight")
    assert_close_rel(db, b64.grad, wdtype if rows < 64 else torch.bfloat16, "grad_bias")


def test_unaligned_views_use_scalar_path():
    ext = load_fused_kernels()
    base = torch.randn(1, 1, 3, 8 * 64 + 1, device="cuda").half()
    x = base[..., 1:].contiguous()  # aligned copy
    view = torch.empty(3 * 512 + 1, device="cuda", dtype=torch.half)[1:].view(1, 1, 3, 512)  # 2-byte offset
    view.copy_(x)
    torch.testing.assert_close(ext.scaled_masked_softmax_forward(view, None, 1.0),
                               ext.scaled_masked_softmax_forward(x, None, 1.0))


def test_unsupported_sizes_raise():
    ext = load_fused_kernels()
    with pytest.raises(RuntimeError, match="unsupported size"):
        ext.scaled_masked_softmax_forward(torch.zeros(1, 1, 1, 16385, device="cuda", dtype=torch.half), None, 1.0)
    with pytest.raises(RuntimeError):
        ext.layer_norm_forward(torch.zeros(2, 16385, device="cuda"), torch.ones(16385, device="cuda"),
                               torch.zeros(16385, device="cuda"), 1e-5, False)


def test_modules_use_kernels_and_match_fallback():
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType

    sm = FusedScaleMaskSoftmax(False, True, AttnMaskType.causal, True, lambda s, m: s.masked_fill(m, -10000.0),
                               True, 0.125)
    x = torch.randn(2, 4, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert sm.is_kernel_available(None, *x.shape)
    fused = sm(x, None)
    torch.testing.assert_close(fused, sm.forward_torch_softmax(x, None), atol=1e-2, rtol=1e-2)
    ln = FusedLayerNorm(1024).cuda()
    h = torch.randn(128, 2, 1024, device="cuda", dtype=torch.bfloat16)
    assert ln.use_kernel(h)
    torch.testing.assert_close(ln(h), ln.forward_torch(h), atol=2e-2, rtol=2e-2)
