"""Learning-rate and weight-decay schedule (Megatron's OptimizerParamScheduler).

Unit-agnostic: "steps" are whatever the caller counts with ``step(increment)`` -- iterations
(increment 1) or samples (increment = global batch size) -- as long as warmup/decay/wd-increment
lengths are given in the same unit.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

_LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
_WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of every param group of ``optimizer`` each step.

    lr: linear warmup from ``init_lr`` to ``max_lr`` over ``lr_warmup_steps``, then decay to ``min_lr``
    at ``lr_decay_steps`` ('constant' stays at ``max_lr``); afterwards ``min_lr``.
    Weight decay rises from ``start_wd`` to ``end_wd`` over ``wd_incr_steps``.
    A group's lr is multiplied by its ``lr_mult`` and its weight decay by its ``wd_mult``.

    Args:
        optimizer: a MegatronOptimizer or torch optimizer (anything with ``param_groups``).
        init_lr, max_lr, min_lr: warmup start, peak and floor learning rates.
        lr_warmup_steps, lr_decay_steps: warmup length and end of decay (same unit as ``step``).
        lr_decay_style: 'constant', 'linear', 'cosine' or 'inverse-square-root'.
        start_wd, end_wd, wd_incr_steps, wd_incr_style: weight-decay schedule ('constant' needs
            start_wd == end_wd).
        use_checkpoint_opt_param_scheduler: on load, take the checkpoint's values.
        override_opt_param_scheduler: on load, keep this object's values (ignore the checkpoint's).
    """

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float, lr_warmup_steps: int,
                 lr_decay_steps: int, lr_decay_style: str, start_wd: float, end_wd: float,
                 wd_incr_steps: int, wd_incr_style: str, use_checkpoint_opt_param_scheduler: bool = True,
                 override_opt_param_scheduler: bool = False):
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr = float(max_lr)
        self.min_lr = min_lr
        if not self.min_lr >= 0.0:
            raise ValueError(f"--min-lr must be >= 0 (got {min_lr})")
        if not self.max_lr >= self.min_lr:
            raise ValueError(f"--lr ({max_lr}) must be >= --min-lr ({min_lr})")
        if not self.init_lr <= self.max_lr:
            raise ValueError(f"warmup init lr ({init_lr}) must be <= --lr ({max_lr})")
        self.lr_warmup_steps = lr_warmup_steps
        self.num_steps = 0
        self.lr_decay_steps = lr_decay_steps
        if not self.lr_decay_steps > 0:
            raise ValueError(f"--lr-decay-iters/--lr-decay-samples must be > 0 (got {lr_decay_steps})")
        if not self.lr_warmup_steps < self.lr_decay_steps:
            raise ValueError(f"lr warmup ({lr_warmup_steps}) must be shorter than lr decay ({lr_decay_steps}); "
                             "lower --lr-warmup-iters/--lr-warmup-fraction or raise --lr-decay-iters")
        if lr_decay_style not in _LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {lr_decay_style!r} is not supported; use one of {_LR_DECAY_STYLES}")
        self.lr_decay_style = lr_decay_style
        self.start_wd = start_wd
        self.end_wd = end_wd
        if not (self.start_wd >= 0.0 and self.end_wd >= self.start_wd):
            raise ValueError(f"need 0 <= --start-weight-decay ({start_wd}) <= --end-weight-decay ({end_wd})")
        if wd_incr_style not in _WD_INCR_STYLES:
            raise ValueError(f"--weight-decay-incr-style {wd_incr_style!r} is not supported; "
                             f"use one of {_WD_INCR_STYLES}")
        if wd_incr_style == "constant" and start_wd != end_wd:
            raise ValueError("--weight-decay-incr-style constant needs --start-weight-decay == --end-weight-decay")
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                             "are both set; pick one")
        self.step(0)
        logger.info("> learning rate decay style: %s", self.lr_decay_style)

    def get_wd(self) -> float:
        """Weight decay at the current step."""
        if self.num_steps > self.wd_incr_steps:
            return self.end_wd
        if self.wd_incr_style == "constant":
            return self.end_wd
        incr_ratio = float(self.num_steps) / float(self.wd_incr_steps)
        delta_wd = self.end_wd - self.start_wd
        if self.wd_incr_style == "linear":
            coeff = incr_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * (1 - incr_ratio)) + 1.0)
        return self.start_wd + coeff * delta_wd

    def get_lr(self, param_group: Optional[Dict[str, Any]] = None) -> float:
        """Learning rate at the current step (before the group's ``lr_mult``).

        A group may carry its own ``max_lr`` / ``min_lr``; otherwise the scheduler's are used.
        """
        param_group = param_group or {}
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        # Linear warmup.
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + ((max_lr - self.init_lr) * float(self.num_steps) /
                                   float(self.lr_warmup_steps))
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup_steps = max(self.lr_warmup_steps, 1)
            num_steps = max(self.num_steps, 1)
            lr = max_lr * warmup_steps ** 0.5 / (num_steps ** 0.5)
            return max(min_lr, lr)
        decay_ratio = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps -
                                                                            self.lr_warmup_steps)
        delta_lr = max_lr - min_lr
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return min_lr + coeff * delta_lr

    def step(self, increment: int) -> None:
        """Advance by ``increment`` steps and set every group's lr and weight decay."""
        self.num_steps += increment
        new_wd = self.get_wd()
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = self.get_lr(param_group) * param_group.get("lr_mult", 1.0)
            param_group["weight_decay"] = new_wd * param_group.get("wd_mult", 1.0)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
        }

    def _check_and_set(self, cls_value, sd_value, name: str):
        if self.override_opt_param_scheduler:
            logger.info(" > overriding %s value to %s", name, cls_value)
            return cls_value
        if not self.use_checkpoint_opt_param_scheduler and cls_value != sd_value:
            raise ValueError(f"OptimizerParamScheduler: {name} is {cls_value} but the checkpoint has {sd_value}; "
                             "pass --use-checkpoint-opt_param-scheduler or --override-opt_param-scheduler")
        logger.info(" > using checkpoint value %s for %s", sd_value, name)
        return sd_value

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore from a (Megatron, including older key names) scheduler state dict."""
        max_lr = sd["start_lr"] if "start_lr" in sd else sd["max_lr"]
        self.max_lr = self._check_and_set(self.max_lr, max_lr, "learning rate")
        self.min_lr = self._check_and_set(self.min_lr, sd["min_lr"], "minimum learning rate")
        warmup = sd.get("warmup_iter", sd.get("warmup_steps", sd.get("lr_warmup_steps")))
        self.lr_warmup_steps = self._check_and_set(self.lr_warmup_steps, warmup, "warmup iterations")
        decay = sd.get("end_iter", sd.get("decay_steps", sd.get("lr_decay_steps")))
        self.lr_decay_steps = self._check_and_set(self.lr_decay_steps, decay, "total number of iterations")
        style = sd["decay_style"] if "decay_style" in sd else sd["lr_decay_style"]
        self.lr_decay_style = self._check_and_set(self.lr_decay_style, style, "learning rate decay style")
        if "start_wd" in sd:
            self.start_wd = self._check_and_set(self.start_wd, sd["start_wd"], "start weight decay")
            self.end_wd = self._check_and_set(self.end_wd, sd["end_wd"], "end weight decay")
            self.wd_incr_steps = self._check_and_set(self.wd_incr_steps, sd["wd_incr_steps"],
                                                     "total number of weight decay iterations")
            self.wd_incr_style = self._check_and_set(self.wd_incr_style, sd["wd_incr_style"],
                                                     "weight decay incr style")
        # Megatron adds the checkpoint's steps to a fresh scheduler; restart from 0 so a reused one agrees.
        num_steps = sd["num_iters"] if "num_iters" in sd else sd["num_steps"]
        self.num_steps = 0
        self.step(increment=num_steps)
