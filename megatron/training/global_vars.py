"""Process-wide training state: parsed args, tokenizer, TensorBoard writer, exit-signal handler.

Only megatron/training uses these; megatron/core never does.
"""

from __future__ import annotations

import signal
from typing import List, Optional

import torch
import torch.distributed as dist

_GLOBAL_ARGS = None
_GLOBAL_TOKENIZER = None
_GLOBAL_TENSORBOARD_WRITER = None
_GLOBAL_SIGNAL_HANDLER = None


def get_args():
    if _GLOBAL_ARGS is None:
        raise RuntimeError("arguments are not initialized; call megatron.training.initialize_megatron() first")
    return _GLOBAL_ARGS


def set_args(args) -> None:
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args


def get_tokenizer():
    return _GLOBAL_TOKENIZER


def set_tokenizer(tokenizer) -> None:
    global _GLOBAL_TOKENIZER
    _GLOBAL_TOKENIZER = tokenizer


def get_tensorboard_writer():
    return _GLOBAL_TENSORBOARD_WRITER


def set_tensorboard_writer(args) -> None:
    """Create the SummaryWriter on the last rank (the one that logs) when --tensorboard-dir is set."""
    global _GLOBAL_TENSORBOARD_WRITER
    if not args.tensorboard_dir or dist.get_rank() != dist.get_world_size() - 1:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is an optional dependency
        from megatron.training.arguments import ArgumentError

        raise ArgumentError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from err
    _GLOBAL_TENSORBOARD_WRITER = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)


class DistributedSignalHandler:
    """Record SIGTERM / SIGUSR1 (SLURM's pre-emption warning) so training stops at a step boundary."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signals = list(signals)
        self._received = False
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self._received = True

    def signals_received(self) -> List[bool]:
        """Whether each rank got a signal (all-gathered, so every rank takes the same decision)."""
        from megatron.training.utils import collective_device

        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
            dist.all_gather(flags, flag)
            return [bool(f.item()) for f in flags]
        return [bool(flag.item())]

    def release(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self.release()


def set_signal_handler() -> DistributedSignalHandler:
    global _GLOBAL_SIGNAL_HANDLER
    _GLOBAL_SIGNAL_HANDLER = DistributedSignalHandler().__enter__()
    return _GLOBAL_SIGNAL_HANDLER


def get_signal_handler() -> Optional[DistributedSignalHandler]:
    return _GLOBAL_SIGNAL_HANDLER


def destroy_global_vars() -> None:
    global _GLOBAL_ARGS, _GLOBAL_TOKENIZER, _GLOBAL_TENSORBOARD_WRITER, _GLOBAL_SIGNAL_HANDLER
    if _GLOBAL_TENSORBOARD_WRITER is not None:
        _GLOBAL_TENSORBOARD_WRITER.close()
    if _GLOBAL_SIGNAL_HANDLER is not None:
        _GLOBAL_SIGNAL_HANDLER.release()
    _GLOBAL_ARGS = _GLOBAL_TOKENIZER = _GLOBAL_TENSORBOARD_WRITER = _GLOBAL_SIGNAL_HANDLER = None
