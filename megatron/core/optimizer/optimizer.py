"""Megatron optimizer wrappers: fp32, and fp16/bf16 params with fp32 master weights.

Every wrapper reads the gradient of a model param from ``param.main_grad`` (the contiguous buffer of
:class:`megatron.core.distributed.DistributedDataParallel`) when it exists, else from ``param.grad``.
``step()`` returns ``(update_successful, grad_norm, num_zeros_in_grad)`` as in Megatron-LM.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.optimizer.clip_grads import (
    clip_grad_by_total_norm_fp32,
    count_zeros_fp32,
    default_model_parallel_group,
    get_grad_norm_fp32,
    param_is_not_shared,
    param_is_not_tensor_parallel_duplicate,
)
from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer_config import OptimizerConfig

logger = logging.getLogger(__name__)

# Attributes of a model param that its fp32 master copy must carry (clip_grads and checkpoint tools read them).
_PARAM_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "shared",
                     "shared_embedding", "sequence_parallel")


def _zero_grad_group_helper(group: List[torch.Tensor], set_to_none: bool) -> None:
    for param in group:
        if param.grad is not None:
            if set_to_none:
                param.grad = None
            else:
                if param.grad.grad_fn is not None:
                    param.grad.detach_()
                else:
                    param.grad.requires_grad_(False)
                param.grad.zero_()


def _copy_param_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    for name in _PARAM_ATTRIBUTES:
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


class MegatronOptimizer(ABC):
    """Base wrapper around a ``torch.optim.Optimizer``.

    Args:
        optimizer: the torch optimizer over the params this wrapper steps.
        config: the :class:`OptimizerConfig`.
        init_state_fn: fills the torch optimizer state for every param (used when loading
            checkpoints that need the state to exist); optional.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                 init_state_fn: Callable = lambda x: None):
        if optimizer is None:
            raise ValueError("MegatronOptimizer needs a torch optimizer")
        self.optimizer = optimizer
        self.config = config
        self.init_state_fn = init_state_fn

    def get_parameters(self) -> List[torch.Tensor]:
        """The params the torch optimizer updates (fp32 masters for the mixed-precision wrapper)."""
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def get_main_grads_for_grad_norm(self) -> List[torch.Tensor]:
        """Grads that count toward the global norm: not ``shared``, replicated ones only on TP rank 0."""
        grads = []
        for param in self.get_parameters():
            if param.grad is not None and param_is_not_shared(param) and \
                    param_is_not_tensor_parallel_duplicate(param):
                grads.append(param.grad)
        return grads

    def get_model_parallel_group(self):
        """The group the grad norm / overflow flag are reduced over: TP x PP (None without parallel state)."""
        return default_model_parallel_group()

    def clip_grad_norm(self, clip_grad: float) -> float:
        """Compute the global grad norm and clip all grads to ``clip_grad``; returns the norm before clipping."""
        grad_norm = get_grad_norm_fp32(self.get_main_grads_for_grad_norm(),
                                       model_parallel_group=self.get_model_parallel_group())
        clip_grad_by_total_norm_fp32(self.get_parameters(), clip_grad, grad_norm)
        return grad_norm

    def count_zeros(self) -> float:
        return count_zeros_fp32(self.get_parameters(), model_parallel_group=self.get_model_parallel_group())

    @abstractmethod
    def zero_grad(self, set_to_none: bool = True) -> None:
        ...

    @abstractmethod
    def get_loss_scale(self) -> torch.Tensor:
        """The current loss scale as a [1] fp32 tensor."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply the loss by the loss scale before ``backward()``."""
        return self.get_loss_scale() * loss

    @abstractmethod
    def reload_model_params(self) -> None:
        """Refresh master copies from the model params (after loading a model checkpoint)."""

    @abstractmethod
    def prepare_grads(self) -> bool:
        """Move grads into place, unscale, and return True if any grad overflowed."""

    @abstractmethod
    def step_with_ready_grads(self) -> bool:
        ...

    @torch.no_grad()
    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        """One optimizer step.

        Returns:
            (update_successful, grad_norm, num_zeros_in_grad): ``(False, None, None)`` when the grads
            overflowed and the step was skipped; ``grad_norm`` is None when clipping is off and
            ``num_zeros_in_grad`` None unless ``log_num_zeros_in_grad``.
        """
        if self.prepare_grads():
            return False, None, None
        grad_norm = None
        if self.config.clip_grad > 0.0:
            grad_norm = self.clip_grad_norm(self.config.clip_grad)
        num_zeros_in_grad = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        success = self.step_with_ready_grads()
        return success, grad_norm, num_zeros_in_grad

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        ...

    @abstractmethod
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        ...

    # Promote the torch optimizer's state and param_groups (the param scheduler sets lr through these).
    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value


class MixedPrecisionOptimizer(MegatronOptimizer):
    """Shared logic of optimizers with fp32 master grads and an optional loss scaler."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                 grad_scaler: Optional[MegatronGradScaler], init_state_fn: Callable = lambda x: None):
        super().__init__(optimizer, config, init_state_fn)
        if grad_scaler is None and config.fp16:
            raise ValueError("fp16 training needs a grad scaler (constant --loss-scale or dynamic)")
        params = self.get_parameters()
        self.device = params[0].device if params else torch.device("cpu")
        self.grad_scaler = grad_scaler.to(self.device) if grad_scaler is not None else None
        self.found_inf = torch.zeros(1, dtype=torch.float, device=self.device)
        self._scale_one = torch.ones(1, dtype=torch.float, device=self.device)

    def get_loss_scale(self) -> torch.Tensor:
        return self._scale_one if self.grad_scaler is None else self.grad_scaler.scale

    def reload_model_params(self) -> None:
        self._copy_model_params_to_main_params()

    @abstractmethod
    def _collect_main_grad_data_for_unscaling(self) -> List[torch.Tensor]:
        ...

    @abstractmethod
    def _copy_model_grads_to_main_grads(self) -> None:
        ...

    @abstractmethod
    def _copy_main_params_to_model_params(self) -> None:
        ...

    @abstractmethod
    def _copy_model_params_to_main_params(self) -> None:
        ...

    def _unscale_main_grads_and_check_for_nan(self) -> bool:
        main_grads = self._collect_main_grad_data_for_unscaling()
        self.found_inf.fill_(0.0)
        if main_grads:
            torch._amp_foreach_non_finite_check_and_unscale_(main_grads, self.found_inf,
                                                             self.grad_scaler.inv_scale)
        group = self.get_model_parallel_group()
        if group is not None and dist.is_initialized():
            # Every model-parallel rank must agree to skip; DP replicas agree already (grads all-reduced).
            dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX, group=group)
        return self.found_inf.item() > 0

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        self._copy_model_grads_to_main_grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_main_grads_and_check_for_nan()
            self.grad_scaler.update(found_inf)
            return found_inf
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        self._copy_main_params_to_model_params()
        return True


class Float16OptimizerWithFloat16Params(MixedPrecisionOptimizer):
    """fp16/bf16 model params stepped through fp32 master copies.

    The torch optimizer's param groups are rewritten in place: each fp16/bf16 param is replaced by an
    fp32 master clone (carrying its tensor-parallel attributes); fp32 params stay as they are.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                 grad_scaler: Optional[MegatronGradScaler], init_state_fn: Callable = lambda x: None):
        super().__init__(optimizer, config, grad_scaler, init_state_fn)
        self.float16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_float16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_fp32_groups: List[List[torch.Tensor]] = []
        for param_group in self.optimizer.param_groups:
            float16_params, fp32_from_float16, fp32_params = [], [], []
            for i, param in enumerate(param_group["params"]):
                if not param.requires_grad:
                    continue
                if param.dtype in (torch.float16, torch.bfloat16):
                    main_param = torch.nn.Parameter(param.detach().clone().float())
                    _copy_param_attributes(main_param, param)
                    param_group["params"][i] = main_param
                    float16_params.append(param)
                    fp32_from_float16.append(main_param)
                    if param in self.optimizer.state:
                        self.optimizer.state[main_param] = self.optimizer.state.pop(param)
                elif param.dtype == torch.float32:
                    fp32_params.append(param)
                else:
                    raise TypeError(f"wrapped parameters must be float16, bfloat16 or float32; got {param.dtype}")
            self.float16_groups.append(float16_params)
            self.fp32_from_float16_groups.append(fp32_from_float16)
            self.fp32_from_fp32_groups.append(fp32_params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for groups in (self.float16_groups, self.fp32_from_float16_groups, self.fp32_from_fp32_groups):
            for group in groups:
                _zero_grad_group_helper(group, set_to_none)

    def _collect_main_grad_data_for_unscaling(self) -> List[torch.Tensor]:
        return [p.grad.data for groups in (self.fp32_from_float16_groups, self.fp32_from_fp32_groups)
                for group in groups for p in group if p.grad is not None]

    def _copy_model_grads_to_main_grads(self) -> None:
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                if hasattr(model_param, "main_grad"):
                    main_param.grad = model_param.main_grad.float()
                elif model_param.grad is not None:
                    main_param.grad = model_param.grad.float()
                model_param.grad = None
        for model_group in self.fp32_from_fp32_groups:
            for model_param in model_group:
                if hasattr(model_param, "main_grad"):
                    model_param.grad = model_param.main_grad

    def _copy_main_params_to_model_params(self) -> None:
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                model_param.data.copy_(main_param.data)

    def _copy_model_params_to_main_params(self) -> None:
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                main_param.data.copy_(model_param.data)

    def state_dict(self) -> Dict[str, Any]:
        """Megatron format: ``optimizer`` (torch state), ``grad_scaler``, ``fp32_from_fp16_params``."""
        state_dict = {"optimizer": self.optimizer.state_dict()}
        if self.grad_scaler is not None:
            state_dict["grad_scaler"] = self.grad_scaler.state_dict()
        state_dict["fp32_from_fp16_params"] = self.fp32_from_float16_groups
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        key = "optimizer" if "optimizer" in state_dict else "optimizer_state_dict"
        self.optimizer.load_state_dict(state_dict[key])
        if "grad_scaler" not in state_dict:
            if self.config.fp16:
                logger.warning("checkpoint has no grad scaler state; keeping the current loss scale")
        elif self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        else:
            logger.warning("checkpoint has a grad scaler but this run uses none; skipping it")
        key = "fp32_from_fp16_params" if "fp32_from_fp16_params" in state_dict else "fp32_from_fp16"
        saved_groups = state_dict[key]
        if len(saved_groups) != len(self.fp32_from_float16_groups):
            raise ValueError(f"optimizer checkpoint has {len(saved_groups)} param groups, this model "
                             f"{len(self.fp32_from_float16_groups)}; was it saved with another model or TP/PP size?")
        for current_group, saved_group in zip(self.fp32_from_float16_groups, saved_groups):
            if len(current_group) != len(saved_group):
                raise ValueError("optimizer checkpoint's fp32 master params do not match this model's params")
            for current_param, saved_param in zip(current_group, saved_group):
                current_param.data.copy_(saved_param.data)


class FP32Optimizer(MegatronOptimizer):
    """Plain fp32 training: steps the model params directly, grads taken from ``main_grad``."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                 init_state_fn: Callable = lambda x: None):
        super().__init__(optimizer, config, init_state_fn)
        params = self.get_parameters()
        self._scale = torch.ones(1, dtype=torch.float, device=params[0].device if params else "cpu")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.optimizer.param_groups:
            _zero_grad_group_helper(group["params"], set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return self._scale

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        for param in self.get_parameters():
            if hasattr(param, "main_grad"):
                param.grad = param.main_grad
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        return True

    def reload_model_params(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
