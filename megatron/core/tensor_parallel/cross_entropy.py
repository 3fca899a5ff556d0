"""Cross entropy over logits split along the vocabulary across tensor-parallel ranks.

No rank ever materialises the full [s, b, V] logits: the max and the sum of exponentials are
all-reduced over TP, and the target logit comes from the rank that owns the target id.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.parallel_state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from megatron.core.tensor_parallel.utils import VocabUtility


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, label_smoothing=0.0):
        # vocab_parallel_logits: [s, b, V/p] (any leading dims); target: [s, b] global ids.
        group = get_tensor_model_parallel_group()
        logits = vocab_parallel_logits.float()
        logits_max = torch.max(logits, dim=-1)[0]  # [s, b]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)  # new tensor; the caller's logits are untouched

        partition_vocab_size = logits.size(-1)
        rank, world_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size, rank, world_size)
        target_mask = (target < vocab_start) | (target >= vocab_end)  # not on this rank
        masked_target = target.clone() - vocab_start
        masked_target[target_mask] = 0

        logits_2d = logits.view(-1, partition_vocab_size)  # [s*b, V/p]
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(logits_2d.size(0), device=logits_2d.device)
        predicted_logits = logits_2d[arange_1d, masked_target_1d].clone().view_as(target)
        predicted_logits[target_mask] = 0.0
        dist.all_reduce(predicted_logits, group=group)  # target logit, from its owner

        exp_logits = torch.exp(logits)  # [s, b, V/p]
        sum_exp_logits = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp_logits, group=group)
        loss = torch.log(sum_exp_logits) - predicted_logits  # [s, b]
        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))  # [s, b, V/p]

        vocab_size = partition_vocab_size * world_size
        if label_smoothing > 0:
            # Megatron's smoothing: target gets (1 - ls), every other class ls / (V - 1).
            if not 0.0 < label_smoothing < 1.0:
                raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
            smoothing = label_smoothing * vocab_size / (vocab_size - 1)
            sum_log_probs = torch.log(softmax.clamp_min(torch.finfo(softmax.dtype).tiny)).sum(dim=-1)
            dist.all_reduce(sum_log_probs, group=group)
            loss = (1.0 - smoothing) * loss - smoothing * sum_log_probs / vocab_size

        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        ctx.input_dtype = vocab_parallel_logits.dtype
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_input = softmax  # d loss / d logits = softmax - target distribution
        partition_vocab_size = softmax.size(-1)
        grad_2d = grad_input.view(-1, partition_vocab_size)
        arange_1d = torch.arange(grad_2d.size(0), device=grad_2d.device)
        on_rank = 1.0 - target_mask.view(-1).float()
        if ctx.label_smoothing > 0:
            smoothing = ctx.label_smoothing * ctx.vocab_size / (ctx.vocab_size - 1)
            grad_2d[arange_1d, masked_target_1d] -= (1.0 - smoothing) * on_rank
            grad_2d -= smoothing / ctx.vocab_size
        else:
            grad_2d[arange_1d, masked_target_1d] -= on_rank
        grad_input = grad_input * grad_output.unsqueeze(-1)
        return grad_input.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross entropy of vocab-split logits.

    Args:
        vocab_parallel_logits: [s, b, V/p] logits of this rank's vocabulary slice.
        target: [s, b] global token ids.
        label_smoothing: Megatron-style smoothing (target 1-ls, others ls/(V-1)).

    Returns:
        [s, b] float32 loss per token.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing)
