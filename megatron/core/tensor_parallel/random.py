"""RNG streams for tensor parallelism and activation recomputation that replays them.

Two streams:

* the default generator (CPU or CUDA), seeded identically on every TP rank: dropout outside
  tensor-parallel regions (e.g. on the residual stream) is the same on all TP ranks;
* the ``model-parallel-rng`` stream of the tracker, seeded ``seed + 2718 + tp_rank``: dropout inside
  TP regions (e.g. on attention probabilities, whose heads are split) differs per TP rank.

The tracker works on CPU and CUDA: it swaps the state of the generator of the device in use.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from torch.utils.checkpoint import detach_variable

from megatron.core.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def _use_cuda() -> bool:
    return torch.cuda.is_available()


def _get_rng_state(cuda: bool) -> torch.Tensor:
    return torch.cuda.get_rng_state() if cuda else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, cuda: bool) -> None:
    if cuda:
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states that can be swapped in with :meth:`fork`.

    Megatron-LM calls this ``CudaRNGStatesTracker``; here it follows the device: it tracks the
    CUDA generator when CUDA is initialised, else the CPU generator.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Create a stream ``name`` seeded with ``seed`` (the current state is left untouched)."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        cuda = _use_cuda()
        orig = _get_rng_state(cuda)
        if cuda:
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states_[name] = _get_rng_state(cuda)
        _set_rng_state(orig, cuda)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with stream ``name``; its advanced state is kept for next time."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name} is not added; call model_parallel_cuda_manual_seed(seed) first")
        cuda = _use_cuda()
        orig = _get_rng_state(cuda)
        _set_rng_state(self.states_[name], cuda)
        try:
            yield
        finally:
            self.states_[name] = _get_rng_state(cuda)
            _set_rng_state(orig, cuda)


_RNG_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process-wide RNG tracker (Megatron-LM name; works on CPU too)."""
    return _RNG_TRACKER


get_rng_tracker = get_cuda_rng_tracker


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` and the model-parallel stream with ``seed+2718+tp_rank``.

    Call after :func:`initialize_model_parallel`. Works on CPU and CUDA.
    """
    tensor_model_parallel_seed = seed + 2718 + get_tensor_model_parallel_rank()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, tensor_model_parallel_seed)


model_parallel_manual_seed = model_parallel_cuda_manual_seed


class CheckpointFunction(torch.autograd.Function):
    """Activation recomputation that restores the RNG states of the forward pass.

    Forward runs ``run_function`` without storing activations; backward restores the CPU, CUDA and
    tracker RNG states captured before the forward, recomputes, back-propagates, and restores the
    states it found. With ``distribute_saved_activations`` the first input is stored split across
    TP ranks and gathered back for the recomputation.
    """

    @staticmethod
    def forward(ctx, run_function, distribute_saved_activations, *args):
        ctx.run_function = run_function
        ctx.distribute_saved_activations = distribute_saved_activations
        ctx.fwd_cpu_rng_state = torch.get_rng_state()
        ctx.fwd_cuda_rng_state = torch.cuda.get_rng_state() if _use_cuda() else None
        ctx.fwd_tracker_states = _RNG_TRACKER.get_states()
        with torch.no_grad():
            outputs = run_function(*args)
        if distribute_saved_activations:
            ctx.input_0_shape = args[0].shape
            ctx.input_0_requires_grad = args[0].requires_grad
            args = (_split_flat_for_tp(args[0]),) + tuple(args[1:])
        ctx.save_for_backward(*args)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpointing is not compatible with .grad(); use .backward()")
        inputs = list(ctx.saved_tensors)
        if ctx.distribute_saved_activations:
            inputs[0] = _gather_flat_from_tp(inputs[0], ctx.input_0_shape)
        cuda = ctx.fwd_cuda_rng_state is not None
        bwd_cpu_rng_state = torch.get_rng_state()
        bwd_cuda_rng_state = torch.cuda.get_rng_state() if cuda else None
        bwd_tracker_states = _RNG_TRACKER.get_states()
        torch.set_rng_state(ctx.fwd_cpu_rng_state)
        if cuda:
            torch.cuda.set_rng_state(ctx.fwd_cuda_rng_state)
        _RNG_TRACKER.set_states(ctx.fwd_tracker_states)
        detached = detach_variable(tuple(inputs))
        if ctx.distribute_saved_activations:
            detached[0].requires_grad_(ctx.input_0_requires_grad)
        try:
            with torch.enable_grad():
                outputs = ctx.run_function(*detached)
        finally:
            torch.set_rng_state(bwd_cpu_rng_state)
            if cuda:
                torch.cuda.set_rng_state(bwd_cuda_rng_state)
            _RNG_TRACKER.set_states(bwd_tracker_states)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(inp.grad if isinstance(inp, torch.Tensor) else None for inp in detached)
        return (None, None) + grads


def checkpoint(function, distribute_saved_activations: bool, *args):
    """Recompute ``function(*args)`` in backward instead of storing its activations."""
    return CheckpointFunction.apply(function, distribute_saved_activations, *args)


def _split_flat_for_tp(tensor: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return tensor.detach()
    flat = tensor.detach().reshape(-1)
    if flat.numel() % world:
        raise ValueError(f"distribute_saved_activations needs numel ({flat.numel()}) divisible by TP ({world})")
    chunk = flat.numel() // world
    rank = get_tensor_model_parallel_rank()
    return flat[rank * chunk:(rank + 1) * chunk].clone()


def _gather_flat_from_tp(chunk: torch.Tensor, shape: Optional[torch.Size]) -> torch.Tensor:
    import torch.distributed as dist

    from megatron.core.parallel_state import get_tensor_model_parallel_group

    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return chunk.reshape(shape)
    parts = [torch.empty_like(chunk) for _ in range(world)]
    dist.all_gather(parts, chunk.contiguous(), group=get_tensor_model_parallel_group())
    return torch.cat(parts).reshape(shape)
