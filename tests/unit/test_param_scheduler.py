"""OptimizerParamScheduler vs the closed-form lr / wd schedules, multipliers and state round trip."""

import math

import pytest
import torch

from megatron.core.optimizer import OptimizerParamScheduler

MAX_LR, MIN_LR, INIT_LR = 3e-4, 3e-5, 0.0


def _expected_lr(style, t, warmup, decay):
    """The schedules written out from their definitions."""
    if warmup > 0 and t <= warmup:
        return INIT_LR + (MAX_LR - INIT_LR) * t / warmup
    if style == "constant":
        return MAX_LR
    if t > decay:
        return MIN_LR
    if style == "inverse-square-root":
        return max(MIN_LR, MAX_LR * math.sqrt(max(warmup, 1)) / math.sqrt(max(t, 1)))
    frac = (t - warmup) / (decay - warmup)
    if style == "linear":
        return MAX_LR - (MAX_LR - MIN_LR) * frac
    return MIN_LR + (MAX_LR - MIN_LR) * (1 + math.cos(math.pi * frac)) / 2


def _optimizer():
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [w], "wd_mult": 1.0, "lr_mult": 1.0},
                              {"params": [b], "wd_mult": 0.0, "lr_mult": 0.5}], lr=1.0)


def _scheduler(opt, style, warmup, decay, **kw):
    args = dict(init_lr=INIT_LR, max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_steps=warmup, lr_decay_steps=decay,
                lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=decay, wd_incr_style="constant")
    args.update(kw)
    return OptimizerParamScheduler(opt, **args)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_lr_matches_closed_form_per_iteration(style, warmup):
    opt = _optimizer()
    sched = _scheduler(opt, style, warmup, decay=100)
    for t in range(0, 121):
        if t:
            sched.step(1)
        want = _expected_lr(style, t, warmup, 100)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), (style, t)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * want, rel=1e-12, abs=1e-18)  # lr_mult
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_sample_based_steps():
    """Megatron counts samples when given --lr-*-samples: increment = global batch size."""
    opt = _optimizer()
    gbs = 32
    sched = _scheduler(opt, "cosine", warmup=5 * gbs, decay=50 * gbs)
    for it in range(1, 60):
        sched.step(gbs)
        assert opt.param_groups[0]["lr"] == pytest.approx(_expected_lr("cosine", it * gbs, 5 * gbs, 50 * gbs))


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_increment(style):
    opt = _optimizer()
    sched = _scheduler(opt, "constant", 0, 100, start_wd=0.0, end_wd=0.2, wd_incr_steps=40, wd_incr_style=style)
    for t in range(1, 60):
        sched.step(1)
        r = min(t / 40, 1.0)
        coeff = r if style == "linear" else (1 - math.cos(math.pi * r)) / 2
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.2 * coeff, abs=1e-15)
        assert opt.param_groups[1]["weight_decay"] == 0.0


def test_state_dict_round_trip_resumes_the_same_schedule():
    ref_opt, opt = _optimizer(), _optimizer()
    ref = _scheduler(ref_opt, "cosine", 10, 100)
    first = _scheduler(_optimizer(), "cosine", 10, 100)
    for _ in range(37):
        ref.step(1)
        first.step(1)
    sd = first.state_dict()
    assert sd["num_steps"] == 37 and sd["lr_decay_style"] == "cosine"
    resumed = _scheduler(opt, "cosine", 10, 100)
    resumed.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    for _ in range(20):
        ref.step(1)
        resumed.step(1)
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_checkpoint_values_vs_class_values():
    sd = _scheduler(_optimizer(), "linear", 10, 100).state_dict()
    # Default: the checkpoint wins.
    s = _scheduler(_optimizer(), "cosine", 5, 200)
    s.load_state_dict(sd)
    assert (s.lr_decay_style, s.lr_warmup_steps, s.lr_decay_steps) == ("linear", 10, 100)
    # Override: the class wins.
    s = _scheduler(_optimizer(), "cosine", 5, 200, use_checkpoint_opt_param_scheduler=False,
                   override_opt_param_scheduler=True)
    s.load_state_dict(sd)
    assert (s.lr_decay_style, s.lr_warmup_steps, s.lr_decay_steps) == ("cosine", 5, 200)
    # Neither: a mismatch is an error naming the flags.
    s = _scheduler(_optimizer(), "cosine", 10, 100, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="override-opt_param-scheduler"):
        s.load_state_dict(sd)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="warmup"):
        _scheduler(_optimizer(), "linear", 100, 100)
    with pytest.raises(ValueError, match="lr-decay-style"):
        _scheduler(_optimizer(), "exponential", 0, 100)
