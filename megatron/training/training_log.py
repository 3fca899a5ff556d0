"""Training log lines in Megatron-LM's exact format, and TensorBoard scalars.

Example (one line)::

     [2026-11-22 10:00:00] iteration       10/     100 | consumed samples:          320 | elapsed time per
     iteration (ms): 812.3 | throughput per GPU (TFLOP/s/GPU): 1.2 | tokens per second per GPU: 403.5 |
     learning rate: 1.500000E-04 | global batch size:    32 | lm loss: 7.123456E+00 | loss scale: 1.0 |
     grad norm: 2.345 | number of skipped iterations:   0 | number of nan iterations:   0 |
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron.training import global_vars
from megatron.training.utils import collective_device, num_floating_point_operations, print_rank_last


def evaluation_line(prefix: str, values: Dict[str, float]) -> str:
    """`` validation loss at <prefix> | lm loss value: X | lm loss PPL: Y | ``"""
    line = f" validation loss at {prefix} | "
    for key, value in values.items():
        line += f"{key} value: {value:.6E} | {key} PPL: {math.exp(min(20.0, value)):.6E} | "
    return line


def format_iteration_line(iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                          tflops_per_gpu: float, tokens_per_sec_per_gpu: float, learning_rate: float,
                          global_batch_size: int, losses: Dict[str, float], loss_scale: float,
                          grad_norm: Optional[float], num_zeros: Optional[float], skipped: int, nans: int,
                          params_norm: Optional[float] = None, timestamp: Optional[str] = None) -> str:
    stamp = timestamp or datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    line = f" [{stamp}] iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    line += f" throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.1f} |"
    line += f" tokens per second per GPU: {tokens_per_sec_per_gpu:.1f} |"
    line += f" learning rate: {learning_rate:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    for key, value in losses.items():
        line += f" {key}: {value:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    if num_zeros is not None:
        line += f" num zeros: {num_zeros:.1f} |"
    if params_norm is not None:
        line += f" params norm: {params_norm:.3f} |"
    line += f" number of skipped iterations: {skipped:3d} |"
    line += f" number of nan iterations: {nans:3d} |"
    return line


def _params_norm(model) -> float:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = torch.zeros(1, dtype=torch.float64, device=collective_device())
    for chunk in model:
        for p in chunk.parameters():
            if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False):
                total += p.detach().double().norm().to(total.device) ** 2
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())


class TrainingLogger:
    """Accumulates per-iteration values and prints one line every --log-interval iterations."""

    def __init__(self, args):
        self.args = args
        self.totals: Dict[str, float] = {}
        self.advanced = 0
        self.skipped = 0
        self.nans = 0
        self.last_time = time.time()
        self.last_iteration = args.iteration

    def record(self, iteration: int, loss_dict: Dict[str, torch.Tensor], learning_rate: float, loss_scale: float,
               grad_norm: Optional[float], num_zeros: Optional[float], skipped: int, model) -> None:
        args = self.args
        self.skipped += skipped
        if not skipped:
            values = {key: float(value) for key, value in loss_dict.items()}
            if any(math.isnan(v) or math.isinf(v) for v in values.values()):
                self.nans += 1  # counted, and kept out of the averages
            else:
                self.advanced += 1
                for key, v in values.items():
                    self.totals[key] = self.totals.get(key, 0.0) + v
        writer = global_vars.get_tensorboard_writer()
        if writer is not None and iteration % args.tensorboard_log_interval == 0:
            writer.add_scalar("learning-rate", learning_rate, iteration)
            writer.add_scalar("batch-size", args.global_batch_size, iteration)
            for key, value in loss_dict.items():
                writer.add_scalar(key, float(value), iteration)
            writer.add_scalar("loss-scale", loss_scale, iteration)
            if grad_norm is not None:
                writer.add_scalar("grad-norm", grad_norm, iteration)
        if iteration % args.log_interval != 0:
            return
        params_norm = _params_norm(model) if args.log_params_norm else None
        now = time.time()
        iters = max(1, iteration - self.last_iteration)
        elapsed = (now - self.last_time) / iters
        flops = num_floating_point_operations(args, args.global_batch_size)
        tflops = flops / (elapsed * args.world_size * 1e12) if elapsed > 0 else 0.0
        tokens = args.global_batch_size * args.seq_length / (elapsed * args.world_size) if elapsed > 0 else 0.0
        losses = {k: v / max(1, self.advanced) for k, v in self.totals.items()}
        line = format_iteration_line(iteration, args.train_iters, args.consumed_train_samples, elapsed * 1000.0,
                                     tflops, tokens, learning_rate, args.global_batch_size, losses, loss_scale,
                                     grad_norm, num_zeros, self.skipped, self.nans, params_norm)
        print_rank_last(line)
        if writer is not None:
            writer.add_scalar("iteration-time", elapsed, iteration)
            writer.add_scalar("throughput-tflops-per-gpu", tflops, iteration)
            writer.flush()
        self.totals, self.advanced, self.skipped, self.nans = {}, 0, 0, 0
        self.last_time, self.last_iteration = now, iteration
