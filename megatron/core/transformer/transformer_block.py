"""ParallelTransformer: this pipeline stage's stack of layers, activation recomputation, final LayerNorm."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import ParallelTransformerLayer, build_layer_norm
from megatron.core.transformer.utils import get_layer_offset, get_num_layers_to_build


class ParallelTransformer(MegatronModule):
    """The layers of one pipeline stage (``layers``) and, on the last stage, ``final_layernorm``.

    Each stage builds ``num_layers / pp`` layers (``/ vpp`` per chunk with the interleaved
    schedule); ``layers`` indices are local to the stage (restart at 0) while each layer knows its
    global 1-based ``layer_number`` (used by query-key layer scaling).

    Args:
        config: transformer config.
        pre_process: first stage: the input comes from the embedding. Otherwise it comes from
            :meth:`set_input_tensor` (the previous stage's output).
        post_process: last stage: apply ``final_layernorm``.
        self_attn_mask_type: causal (GPT) or padding.
        post_layer_norm: build the final LayerNorm on the last stage.
    """

    def __init__(self, config: TransformerConfig, pre_process: bool = True, post_process: bool = True,
                 self_attn_mask_type: AttnMaskType = AttnMaskType.causal, post_layer_norm: bool = True):
        super().__init__(config)
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor: Optional[torch.Tensor] = None
        self.num_layers = get_num_layers_to_build(config)
        offset = get_layer_offset(config)
        self.layers = nn.ModuleList([
            ParallelTransformerLayer(config, layer_number=i + 1 + offset, self_attn_mask_type=self_attn_mask_type)
            for i in range(self.num_layers)])
        if post_process and post_layer_norm:
            self.final_layernorm = build_layer_norm(config)
        else:
            self.final_layernorm = None
        self.recompute_granularity = config.recompute_granularity
        self.recompute_method = config.recompute_method
        self.recompute_num_layers = config.recompute_num_layers
        self.distribute_saved_activations = config.distribute_saved_activations

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Use ``input_tensor`` ([s, b, h]) as this stage's input (non-first pipeline stages)."""
        self.input_tensor = input_tensor

    def _checkpointed_forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """Full recomputation: 'uniform' chunks of recompute_num_layers, or 'block' first N layers."""

        def custom(start: int, end: int):
            def custom_forward(x, mask):
                for index in range(start, end):
                    x = self.layers[index](x, mask)
                return x

            return custom_forward

        n = self.recompute_num_layers
        if self.recompute_method == "uniform":
            start = 0
            while start < self.num_layers:
                end = min(start + n, self.num_layers)
                hidden_states = tensor_parallel.checkpoint(custom(start, end), self.distribute_saved_activations,
                                                           hidden_states, attention_mask)
                start = end
        else:  # block
            for index in range(self.num_layers):
                if index < n:
                    hidden_states = tensor_parallel.checkpoint(custom(index, index + 1),
                                                               self.distribute_saved_activations,
                                                               hidden_states, attention_mask)
                else:
                    hidden_states = self.layers[index](hidden_states, attention_mask)
        return hidden_states

    def forward(self, hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """hidden_states: [s, b, h] ([s/tp, b, h] with SP; ignored on non-first stages) -> same shape."""
        if not self.pre_process:
            if self.input_tensor is None:
                raise RuntimeError("ParallelTransformer on a non-first pipeline stage needs set_input_tensor() "
                                   "before forward()")
            hidden_states = self.input_tensor
        # With sequence parallelism each TP rank holds a different part of the sequence, so dropout on
        # the residual stream must use the per-rank model-parallel RNG stream.
        rng_context = (tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel
                       else contextlib.nullcontext())
        with rng_context:
            if self.recompute_granularity == "full" and torch.is_grad_enabled():
                hidden_states = self._checkpointed_forward(hidden_states, attention_mask)
            else:
                for layer in self.layers:
                    hidden_states = layer(hidden_states, attention_mask)
        if self.final_layernorm is not None:
            # With --fp32-residual-connection the stream is fp32; the logits run in params_dtype.
            hidden_states = self.final_layernorm(hidden_states).to(self.config.params_dtype)
        return hidden_states
