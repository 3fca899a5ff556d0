"""ParallelMLP: h -> ffn (column-parallel), GeLU, ffn -> h (row-parallel)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import erf_gelu, openai_gelu


class ParallelMLP(MegatronModule):
    """Transformer MLP ``Y = GeLU(X A + a) B + b``.

    ``dense_h_to_4h`` (A: [h, ffn]) is split by columns, so each rank computes its ffn/tp slice of
    the activations without communication; ``dense_4h_to_h`` (B: [ffn, h]) is split by rows and its
    partial products are all-reduced (reduce-scattered with sequence parallelism). The output bias
    ``b`` is returned separately for the fused bias-dropout-add.

    GeLU: erf form by default; tanh approximation with ``openai_gelu``; ``bias_gelu_fusion`` uses
    the fused bias + tanh-GeLU (Megatron-LM's fused op is the tanh form too).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.dense_h_to_4h = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, config=config, init_method=config.init_method,
            bias=config.add_bias_linear, gather_output=False, skip_bias_add=True)
        self.bias_gelu_fusion = config.bias_gelu_fusion
        self.activation_func = openai_gelu if config.openai_gelu else erf_gelu
        self.dense_4h_to_h = tensor_parallel.RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True)

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden_states: [s, b, h] ([s/tp, b, h] with SP) -> (output like the input, bias [h] or None)."""
        intermediate, bias = self.dense_h_to_4h(hidden_states)  # [s, b, ffn/tp]
        if self.bias_gelu_fusion:
            intermediate = bias_gelu_impl(intermediate, bias)
        else:
            if bias is not None:
                intermediate = intermediate + bias
            intermediate = self.activation_func(intermediate)
        return self.dense_4h_to_h(intermediate)
