"""Megatron optimizers (single process) against torch reference optimizers on the same params/grads."""

import copy
import io

import pytest
import torch

from megatron.core.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerConfig,
    get_megatron_optimizer,
)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc2 = torch.nn.Linear(8, 3)


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = _Net()
    with torch.no_grad():  # make norm params non-trivial
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net.to(dtype)


def _reference_adamw(ref_net, cfg):
    """Hand-built AdamW param groups: decay only the 2-D weights."""
    decay = [ref_net.fc1.weight, ref_net.fc2.weight]
    no_decay = [ref_net.fc1.bias, ref_net.norm.weight, ref_net.norm.bias, ref_net.fc2.bias]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _grads(net, step, scale=1.0):
    """Deterministic per-step grads, rounded so they are exact in fp16 after scaling by `scale`."""
    g = torch.Generator().manual_seed(1000 + step)
    out = {}
    for name, p in net.named_parameters():
        raw = torch.randn(p.shape, generator=g) * 0.1
        out[name] = (raw * scale).half().float() / scale
    return out


def _state_of(opt_params):
    return [p.detach().clone() for p in opt_params]


def test_param_groups_no_weight_decay_on_bias_and_norm():
    net = _net()
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=0.0), [net])
    by_id = {id(p): n for n, p in net.named_parameters()}
    groups = {g["wd_mult"]: sorted(by_id[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups[1.0] == ["fc1.weight", "fc2.weight"]
    assert groups[0.0] == ["fc1.bias", "fc2.bias", "norm.bias", "norm.weight"]
    for g in opt.param_groups:
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"]) and g["lr"] == 1e-3


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_weight_decay_only_shrinks_matrices(kind):
    """With zero grads only decoupled decay (Adam) or L2 (SGD) moves params: w <- w * (1 - lr * wd)."""
    net = _net()
    before = copy.deepcopy(net)
    lr, wd = 0.1, 0.5
    opt = get_megatron_optimizer(OptimizerConfig(optimizer=kind, lr=lr, weight_decay=wd, clip_grad=0.0), [net])
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    assert opt.step()[0]
    for (name, p), p0 in zip(net.named_parameters(), before.parameters()):
        if p.dim() == 2:
            torch.testing.assert_close(p, p0 * (1 - lr * wd), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p, p0), name


def test_fp32_optimizer_matches_torch_adamw_with_clipping():
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.05, log_num_zeros_in_grad=True)
    net, ref = _net(), _net()
    opt = get_megatron_optimizer(cfg, [net])
    assert isinstance(opt, FP32Optimizer)
    ref_opt = _reference_adamw(ref, cfg)
    for step in range(4):
        grads = _grads(net, step)
        grads["fc2.bias"][0] = 0.0  # two exact zeros
        grads["fc1.bias"][3] = 0.0
        for (name, p), rp in zip(net.named_parameters(), ref.parameters()):
            p.main_grad = grads[name].clone()  # the DDP buffer path
            rp.grad = grads[name].clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.clip_grad)
        ref_opt.step()
        ok, norm, zeros = opt.step()
        assert ok and zeros == 2
        assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
        for p, rp in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, rp, rtol=1e-6, atol=1e-7)
        opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float16_optimizer_masters_track_fp32_adamw(dtype):
    fp16 = dtype == torch.float16
    scale = 2.0**12
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.0, fp16=fp16, bf16=not fp16,
                          params_dtype=dtype, initial_loss_scale=scale, loss_scale_window=1000)
    net = _net(dtype=dtype)
    ref = _net().to(dtype).float()  # the reference starts from the same (rounded) weights, in fp32
    opt = get_megatron_optimizer(cfg, [net])
    assert isinstance(opt, Float16OptimizerWithFloat16Params)
    assert opt.get_loss_scale().item() == (scale if fp16 else 1.0)
    ref_opt = _reference_adamw(ref, cfg)
    for step in range(5):
        grads = _grads(net, step, scale if fp16 else 1.0)
        for (name, p), rp in zip(net.named_parameters(), ref.parameters()):
            if fp16:  # scaled fp16 grads in .grad (no DDP)
                p.grad = (grads[name] * scale).to(dtype)
            else:  # bf16 with fp32 main grads (DDP grad_reduce_in_fp32)
                p.main_grad = grads[name].clone()
            rp.grad = grads[name].clone()
        ref_opt.step()
        assert opt.step() == (True, None, None)
        masters = [p for g in opt.fp32_from_float16_groups for p in g]
        by_name = dict(zip([n for n, _ in net.named_parameters()], net.parameters()))
        for name, rp in zip([n for n, _ in ref.named_parameters()], ref.parameters()):
            master = next(m for m, mp in zip(masters, [p for g in opt.float16_groups for p in g])
                          if mp is by_name[name])
            assert torch.equal(master, rp), name  # identical fp32 grads -> identical AdamW update
            assert torch.equal(by_name[name], rp.to(dtype)), name  # model params = rounded masters
        opt.zero_grad()


def _fp16_setup(hysteresis=1):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.0, clip_grad=1.0, fp16=True, params_dtype=torch.float16,
                          initial_loss_scale=2.0**10, hysteresis=hysteresis, loss_scale_window=2)
    net = _net(dtype=torch.float16)
    return cfg, net, get_megatron_optimizer(cfg, [net])


def _fp16_step(net, opt, step, overflow=False):
    scale = opt.get_loss_scale().item()
    grads = _grads(net, step, scale)
    for name, p in net.named_parameters():
        p.grad = (grads[name] * scale).half()
    if overflow:
        net.fc1.weight.grad[0, 0] = float("inf")
        net.norm.bias.grad[1] = float("nan")
    return opt.step()


def test_overflow_skips_step_and_backs_off_scale():
    cfg, net, opt = _fp16_setup(hysteresis=1)
    _fp16_step(net, opt, 0)
    masters = _state_of(opt.get_parameters())
    model = _state_of(net.parameters())
    adam_steps = [opt.state[p]["step"].item() for p in opt.get_parameters()]
    skipped = 0
    ok, norm, zeros = _fp16_step(net, opt, 1, overflow=True)
    skipped += int(not ok)
    assert (ok, norm, zeros) == (False, None, None) and skipped == 1
    assert opt.get_loss_scale().item() == 2.0**9  # hysteresis 1: halved at once
    for a, b in zip(masters, opt.get_parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model, net.parameters()):
        assert torch.equal(a, b)
    assert [opt.state[p]["step"].item() for p in opt.get_parameters()] == adam_steps
    ok, norm, _ = _fp16_step(net, opt, 2)
    assert ok and norm > 0
    ok, _, _ = _fp16_step(net, opt, 3)
    assert ok and opt.get_loss_scale().item() == 2.0**10  # grows back after window=2 clean steps
    assert not all(torch.equal(a, b) for a, b in zip(model, net.parameters()))


def test_fp16_state_dict_round_trip_is_bit_exact():
    cfg, net, opt = _fp16_setup(hysteresis=2)
    for step in range(3):
        _fp16_step(net, opt, step, overflow=(step == 1))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    assert set(ckpt["optimizer"]) == {"optimizer", "grad_scaler", "fp32_from_fp16_params"}

    _, net2, opt2 = _fp16_setup(hysteresis=2)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    for step in range(3, 7):
        r1 = _fp16_step(net, opt, step, overflow=(step == 4))
        r2 = _fp16_step(net2, opt2, step, overflow=(step == 4))
        assert r1 == r2
        assert opt.get_loss_scale().item() == opt2.get_loss_scale().item()
        for a, b in zip(opt.get_parameters(), opt2.get_parameters()):
            assert torch.equal(a, b)
        for a, b in zip(net.parameters(), net2.parameters()):
            assert torch.equal(a, b)


def test_reload_model_params_refreshes_masters():
    _, net, opt = _fp16_setup()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    opt.reload_model_params()
    for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
        for p, master in zip(model_group, main_group):
            assert torch.equal(master, p.float())
    assert sum(len(g) for g in opt.float16_groups) == len(list(net.parameters()))


def test_scale_loss_and_bad_config():
    _, _, opt = _fp16_setup()
    assert opt.scale_loss(torch.tensor(3.0)).item() == 3.0 * 2.0**10
    with pytest.raises(ValueError, match="--lr"):
        get_megatron_optimizer(OptimizerConfig(), [_net()])
    with pytest.raises(ValueError, match="--optimizer"):
        OptimizerConfig(optimizer="lamb")
