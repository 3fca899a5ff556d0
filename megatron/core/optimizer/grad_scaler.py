"""Loss (gradient) scalers for fp16 training: constant and Megatron's dynamic scaler with hysteresis.

The scale is kept as a 1-element fp32 tensor on the training device so that multiplying the loss and
unscaling the grads never synchronises with the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Union

import torch


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MegatronGradScaler(ABC):
    """Base class: holds the current scale as a [1] fp32 tensor.

    Args:
        initial_scale: the first loss scale (> 0).
        device: where the scale tensor lives (default: the current CUDA device, else CPU).
    """

    def __init__(self, initial_scale: float, device: Optional[Union[str, torch.device]] = None):
        if not initial_scale > 0.0:
            raise ValueError(f"loss scale must be > 0 (got {initial_scale}); check --loss-scale / "
                             "--initial-loss-scale")
        self.device = torch.device(device) if device is not None else _default_device()
        self._scale = torch.tensor([initial_scale], dtype=torch.float, device=self.device)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    def to(self, device: Union[str, torch.device]) -> MegatronGradScaler:
        """Move the scaler's tensors to ``device`` (the optimizer calls this with its params' device)."""
        self.device = torch.device(device)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(self.device))
        return self

    @abstractmethod
    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step; ``found_inf`` says whether the grads overflowed."""

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        ...

    @abstractmethod
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        ...


class ConstantGradScaler(MegatronGradScaler):
    """A fixed loss scale (``--loss-scale``); overflowing steps are still skipped by the optimizer."""

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        pass


class DynamicGradScaler(MegatronGradScaler):
    """Megatron's dynamic loss scaler.

    On an overflow the growth tracker resets and the hysteresis tracker decrements; once it reaches 0
    the scale is multiplied by ``backoff_factor`` (never below ``min_scale``) on this and every further
    overflow. After ``growth_interval`` consecutive clean steps the scale is multiplied by
    ``growth_factor`` and the hysteresis tracker is refilled.

    Args:
        initial_scale: first scale (``--initial-loss-scale``).
        min_scale: lower bound of the scale (``--min-loss-scale``).
        growth_factor: > 1, applied after ``growth_interval`` clean steps.
        backoff_factor: in (0, 1), applied on overflow once hysteresis is exhausted.
        growth_interval: clean steps before growing (``--loss-scale-window``).
        hysteresis: overflows tolerated before backing off (``--hysteresis``).
        device: where the scale tensors live.
    """

    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__(initial_scale, device)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(f"--min-loss-scale ({min_scale}) must be > 0 and <= --initial-loss-scale "
                             f"({initial_scale})")
        if not growth_factor > 1.0:
            raise ValueError(f"loss-scale growth factor must be > 1 (got {growth_factor})")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"loss-scale backoff factor must be in (0, 1) (got {backoff_factor})")
        if not growth_interval > 0:
            raise ValueError(f"--loss-scale-window must be > 0 (got {growth_interval})")
        if not hysteresis > 0:
            raise ValueError(f"--hysteresis must be > 0 (got {hysteresis})")
        self.min_scale = torch.tensor([min_scale], dtype=torch.float, device=self.device)
        self.growth_factor = torch.tensor([growth_factor], dtype=torch.float, device=self.device)
        self.backoff_factor = torch.tensor([backoff_factor], dtype=torch.float, device=self.device)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._scale = state_dict["scale"].to(device=self.device, dtype=torch.float)
        self._growth_tracker = state_dict["growth_tracker"]
        self._hysteresis_tracker = state_dict["hysteresis_tracker"]
