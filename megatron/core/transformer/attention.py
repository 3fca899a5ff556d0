"""Self-attention: tensor-parallel QKV projection, core attention (softmax or SDPA), output projection."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.parallel_state import get_tensor_model_parallel_world_size
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import attention_mask_func


class CoreAttention(MegatronModule):
    """softmax(Q K^T / sqrt(hn) + mask) V on this rank's heads; no parameters.

    Two implementations: the Megatron path (baddbmm, :class:`FusedScaleMaskSoftmax`, dropout, bmm)
    and, with ``config.use_flash_attn``, ``torch.nn.functional.scaled_dot_product_attention``.
    Attention dropout runs inside the model-parallel RNG stream (heads differ per TP rank); with
    sequence parallelism the whole transformer already runs inside that stream.

    Args:
        config: transformer config.
        layer_number: global 1-based layer index (query-key layer scaling coefficient).
        attn_mask_type: causal (GPT) or padding.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__(config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.sequence_parallel = config.sequence_parallel
        self.use_flash_attn = config.use_flash_attn
        world_size = get_tensor_model_parallel_world_size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)

        coeff = self.layer_number if config.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head) * (coeff or 1)
        self.scale_mask_softmax = FusedScaleMaskSoftmax(
            config.fp16, config.bf16, attn_mask_type, config.masked_softmax_fusion, attention_mask_func,
            config.attention_softmax_in_fp32, coeff)
        self.attention_dropout_p = config.attention_dropout
        self.attention_dropout = torch.nn.Dropout(config.attention_dropout)

    def _dropout_context(self):
        if self.sequence_parallel:
            import contextlib

            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """query/key/value: [s, b, np, hn] -> context [sq, b, np*hn].

        attention_mask: None (causal) or the complete bool mask [b|1, 1, sq, sk], True = masked out
        (it must contain the causal part itself, as Megatron's get_ltor_masks_and_position_ids builds it).
        """
        if self.use_flash_attn:
            return self._sdpa_forward(query, key, value, attention_mask)
        sq, b, np_, hn = query.shape
        sk = key.size(0)
        q = query.reshape(sq, b * np_, hn).transpose(0, 1)  # [b*np, sq, hn]
        k = key.reshape(sk, b * np_, hn).transpose(0, 1)  # [b*np, sk, hn]
        v = value.reshape(sk, b * np_, hn).transpose(0, 1)  # [b*np, sk, hn]
        scores = torch.baddbmm(torch.empty(b * np_, sq, sk, dtype=q.dtype, device=q.device), q, k.transpose(1, 2),
                               beta=0.0, alpha=1.0 / self.norm_factor)
        scores = scores.view(b, np_, sq, sk)  # [b, np, sq, sk]
        probs = self.scale_mask_softmax(scores, attention_mask)  # [b, np, sq, sk]
        with self._dropout_context():
            probs = self.attention_dropout(probs)
        context = torch.bmm(probs.view(b * np_, sq, sk), v)  # [b*np, sq, hn]
        context = context.view(b, np_, sq, hn).permute(2, 0, 1, 3).contiguous()  # [sq, b, np, hn]
        return context.view(sq, b, np_ * hn)  # [sq, b, np*hn]

    def _sdpa_forward(self, query, key, value, attention_mask):
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        # As in FusedScaleMaskSoftmax: a given mask is complete (it includes the causal part); None = causal.
        attn_mask, is_causal = None, False
        if attention_mask is None:
            is_causal = self.attn_mask_type == AttnMaskType.causal
        else:
            attn_mask = ~attention_mask  # SDPA: True = attend
        dropout_p = self.attention_dropout_p if self.training else 0.0
        with self._dropout_context():
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal, scale=1.0 / math.sqrt(hn))
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # [sq, b, np*hn]


class ParallelAttention(MegatronModule):
    """Self-attention with a column-parallel QKV projection and a row-parallel output projection.

    ``query_key_value``: [h] -> [3 * np * hn], columns split by heads across TP ranks; each rank's
    output is laid out per head as [np/tp, 3, hn] (q, k, v interleaved per head, Megatron order).
    ``dense``: [np * hn] -> [h], rows split across TP ranks, bias returned for bias-dropout-add.

    Args:
        config: transformer config.
        layer_number: global 1-based layer index.
        attn_mask_type: causal (GPT) or padding.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__(config)
        self.layer_number = max(1, layer_number)
        projection_size = config.kv_channels * config.num_attention_heads
        world_size = get_tensor_model_parallel_world_size()
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.query_key_value = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 3 * projection_size, config=config, init_method=config.init_method,
            bias=config.add_bias_linear, gather_output=False)
        self.core_attention = CoreAttention(config, self.layer_number, attn_mask_type)
        self.checkpoint_core_attention = config.recompute_granularity == "selective"
        self.dense = tensor_parallel.RowParallelLinear(
            projection_size, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True)

    def _checkpointed_attention_forward(self, query, key, value, attention_mask):
        def custom_forward(q, k, v, mask):
            return self.core_attention(q, k, v, mask)

        return tensor_parallel.checkpoint(custom_forward, False, query, key, value, attention_mask)

    def forward(self, hidden_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden_states: [s, b, h] ([s/tp, b, h] with SP) -> (output [s, b, h] or [s/tp, b, h], bias [h])."""
        mixed, _ = self.query_key_value(hidden_states)  # [s, b, 3 * np/tp * hn]
        sq, b = mixed.shape[:2]
        mixed = mixed.view(sq, b, self.num_attention_heads_per_partition, 3 * self.hidden_size_per_attention_head)
        query, key, value = torch.split(mixed, self.hidden_size_per_attention_head, dim=-1)  # [s, b, np, hn]
        if self.checkpoint_core_attention and torch.is_grad_enabled():
            context = self._checkpointed_attention_forward(query, key, value, attention_mask)
        else:
            context = self.core_attention(query, key, value, attention_mask)  # [s, b, np*hn]
        return self.dense(context)
