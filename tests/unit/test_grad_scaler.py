"""Loss scalers: Megatron's dynamic rule (hysteresis, backoff, min scale, growth) and state round trip."""

import pytest
import torch

from megatron.core.optimizer import ConstantGradScaler, DynamicGradScaler


def _scaler(initial=2.0**16, min_scale=1.0, window=4, hysteresis=2):
    return DynamicGradScaler(initial_scale=initial, min_scale=min_scale, growth_factor=2.0,
                             backoff_factor=0.5, growth_interval=window, hysteresis=hysteresis, device="cpu")


def test_hysteresis_delays_backoff_then_every_overflow_halves():
    s = _scaler(initial=1024.0, hysteresis=3)
    s.update(True)
    s.update(True)
    assert s.scale.item() == 1024.0  # two overflows tolerated
    s.update(True)
    assert s.scale.item() == 512.0  # third one backs off
    s.update(True)
    assert s.scale.item() == 256.0  # hysteresis exhausted: every further overflow halves
    assert s.inv_scale.item() == 1.0 / 256.0


def test_clean_steps_do_not_refill_hysteresis_before_growth():
    s = _scaler(initial=1024.0, window=4, hysteresis=2)
    s.update(True)  # hysteresis 2 -> 1, no backoff
    for _ in range(3):
        s.update(False)  # 3 clean steps < window: no growth, no refill
    s.update(True)  # hysteresis 1 -> 0: backoff
    assert s.scale.item() == 512.0


def test_growth_after_window_resets_tracker_and_refills_hysteresis():
    s = _scaler(initial=8.0, window=4, hysteresis=2)
    for _ in range(3):
        s.update(False)
    assert s.scale.item() == 8.0
    s.update(False)
    assert s.scale.item() == 16.0  # exactly after `window` clean steps
    for _ in range(4):
        s.update(False)
    assert s.scale.item() == 32.0
    s.update(True)
    assert s.scale.item() == 32.0  # hysteresis refilled by the growth
    s.update(True)
    assert s.scale.item() == 16.0
    # An overflow resets the growth tracker: 3 clean + overflow + 3 clean does not grow.
    for _ in range(3):
        s.update(False)
    s.update(True)
    for _ in range(3):
        s.update(False)
    assert s.scale.item() == 8.0


def test_min_scale_is_a_floor():
    s = _scaler(initial=4.0, min_scale=2.0, hysteresis=1)
    for _ in range(5):
        s.update(True)
    assert s.scale.item() == 2.0


def test_state_dict_round_trip_continues_identically():
    a = _scaler(initial=2.0**10, window=3, hysteresis=2)
    pattern = [False, True, False, False, True, True, False, False, False, False, True]
    for f in pattern[:6]:
        a.update(f)
    sd = a.state_dict()
    b = _scaler(initial=1.0, window=3, hysteresis=2)
    b.load_state_dict(sd)
    for f in pattern[6:]:
        a.update(f)
        b.update(f)
        assert b.scale.item() == a.scale.item()
    assert b.state_dict()["growth_tracker"] == a.state_dict()["growth_tracker"]
    assert b.state_dict()["hysteresis_tracker"] == a.state_dict()["hysteresis_tracker"]


def test_constant_scaler_never_changes():
    s = ConstantGradScaler(128.0, device="cpu")
    for f in (True, True, False):
        s.update(f)
    assert s.scale.item() == 128.0 and s.state_dict() == {}
    assert s.scale.dtype == torch.float32 and s.scale.shape == (1,)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="min-loss-scale"):
        _scaler(initial=1.0, min_scale=2.0)
    with pytest.raises(ValueError, match="hysteresis"):
        _scaler(hysteresis=0)
    with pytest.raises(ValueError, match="loss scale must be > 0"):
        ConstantGradScaler(0.0)
