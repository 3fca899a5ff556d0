"""ParallelTransformerLayer: pre-LayerNorm self-attention and MLP blocks with bias-dropout-add residuals."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.transformer.attention import ParallelAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import ParallelMLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import default_device, init_rng


def build_layer_norm(config: TransformerConfig) -> FusedLayerNorm:
    """A FusedLayerNorm of width h with the config's epsilon, dtype and sequence-parallel marking."""
    norm = FusedLayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                          persist_layer_norm=config.persist_layer_norm,
                          sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype)
    return norm.to(default_device(config))  # Module.to keeps the sequence_parallel param attributes


class ParallelTransformerLayer(MegatronModule):
    """One GPT-2 layer: ``x + Attn(LN(x))`` then ``y + MLP(LN(y))`` (pre-LayerNorm).

    Submodules (checkpoint names): ``input_layernorm``, ``self_attention``,
    ``post_attention_layernorm``, ``mlp``. Input and output are [s, b, h] ([s/tp, b, h] with
    sequence parallelism).

    Args:
        config: transformer config.
        layer_number: global 1-based index of this layer in the whole model.
        self_attn_mask_type: causal (GPT) or padding.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 self_attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__(config)
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.bias_dropout_fusion = config.bias_dropout_fusion
        with init_rng(layer_number):  # weights depend on (seed, global layer number) only: PP-invariant
            self.input_layernorm = build_layer_norm(config)
            self.self_attention = ParallelAttention(config, layer_number, attn_mask_type=self_attn_mask_type)
            self.post_attention_layernorm = build_layer_norm(config)
            self.mlp = ParallelMLP(config)

    def _layer_norm(self, norm: FusedLayerNorm, x: torch.Tensor) -> torch.Tensor:
        out = norm(x)
        if self.config.fp32_residual_connection and out.dtype != self.config.params_dtype:
            out = out.to(self.config.params_dtype)  # residual stream fp32, matmuls in params dtype
        return out

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """hidden_states: [s, b, h]; attention_mask: bool [b|1, 1, s, s] (True = masked) or None."""
        bias_dropout_add = get_bias_dropout_add(self.training, self.bias_dropout_fusion)

        layernorm_output = self._layer_norm(self.input_layernorm, hidden_states)  # [s, b, h]
        attention_output, attention_bias = self.self_attention(layernorm_output, attention_mask)
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else hidden_states
        layernorm_input = bias_dropout_add(attention_output, attention_bias, residual, self.hidden_dropout)

        layernorm_output = self._layer_norm(self.post_attention_layernorm, layernorm_input)
        mlp_output, mlp_bias = self.mlp(layernorm_output)
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else layernorm_input
        return bias_dropout_add(mlp_output, mlp_bias, residual, self.hidden_dropout)  # [s, b, h]
