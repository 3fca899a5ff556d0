"""Embedding and TransformerLanguageModel (embedding -> encoder -> optional output layer), Megatron legacy layout."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import ParallelTransformer
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    OUTPUT_LAYER_INIT_KEY,
    POSITION_EMBEDDINGS_INIT_KEY,
    TOKENTYPE_EMBEDDINGS_INIT_KEY,
    WORD_EMBEDDINGS_INIT_KEY,
    default_device,
    init_rng,
)


def parallel_lm_logits(input_: torch.Tensor, word_embeddings_weight: torch.Tensor, parallel_output: bool,
                       sequence_parallel: bool = False, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits ``X E^T`` against this rank's vocabulary slice of ``E`` ([V/tp, h]).

    Args:
        input_: [s, b, h] hidden states ([s/tp, b, h] with sequence parallelism: gathered here).
        word_embeddings_weight: [V/tp, h] (tied embedding or untied output layer weight).
        parallel_output: keep the logits split over the vocabulary ([s, b, V/tp]); else all-gather [s, b, V].
        sequence_parallel: the input is split along the sequence.
        bias: optional [V/tp] bias.
    """
    if sequence_parallel:
        input_parallel = tensor_parallel.gather_from_sequence_parallel_region(input_)  # [s, b, h]
    else:
        input_parallel = tensor_parallel.copy_to_tensor_model_parallel_region(input_)
    logits_parallel = F.linear(input_parallel, word_embeddings_weight, bias)  # [s, b, V/tp]
    if parallel_output:
        return logits_parallel
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits_parallel)  # [s, b, V]


class Embedding(MegatronModule):
    """Word (vocab-parallel) + learned position (+ optional token-type) embeddings, then dropout.

    Output is [s, b, h]; with sequence parallelism it is scattered to [s/tp, b, h] and the dropout
    runs in the per-rank model-parallel RNG stream.

    Args:
        config: transformer config.
        vocab_size: padded vocabulary size (divisible by the TP size).
        max_sequence_length: rows of the position table.
        embedding_dropout_prob: dropout on the summed embeddings.
        num_tokentypes: size of the token-type table (0 = none; BERT uses 2).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 embedding_dropout_prob: float, num_tokentypes: int = 0):
        super().__init__(config)
        self.hidden_size = config.hidden_size
        self.sequence_parallel = config.sequence_parallel
        self.fp32_residual_connection = config.fp32_residual_connection
        with init_rng(WORD_EMBEDDINGS_INIT_KEY):
            self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
                vocab_size, config.hidden_size, init_method=config.init_method, config=config)
        with init_rng(POSITION_EMBEDDINGS_INIT_KEY):
            self.position_embeddings = self._replicated_embedding(max_sequence_length)
        self.num_tokentypes = num_tokentypes
        self.tokentype_embeddings = None
        if num_tokentypes > 0:
            with init_rng(TOKENTYPE_EMBEDDINGS_INIT_KEY):
                self.tokentype_embeddings = self._replicated_embedding(num_tokentypes)
        self.embedding_dropout = nn.Dropout(embedding_dropout_prob)

    def _replicated_embedding(self, rows: int) -> nn.Embedding:
        """An embedding table identical on every TP rank, drawn in fp32 from the (TP-shared) default RNG."""
        emb = nn.Embedding(rows, self.hidden_size, dtype=self.config.params_dtype, device=default_device(self.config))
        if self.config.perform_initialization:
            master = torch.empty(rows, self.hidden_size, dtype=torch.float32)
            self.config.init_method(master)
            with torch.no_grad():
                emb.weight.copy_(master.to(emb.weight.device))
        return emb

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, position_ids: [b, s] -> [s, b, h] ([s/tp, b, h] with sequence parallelism)."""
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [b, s, h]
        if tokentype_ids is not None:
            if self.tokentype_embeddings is None:
                raise ValueError("tokentype_ids given but the model was built with num_tokentypes=0")
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        embeddings = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        if self.fp32_residual_connection:
            embeddings = embeddings.float()
        if self.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)  # [s/tp, b, h]
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(embeddings)
        return self.embedding_dropout(embeddings)


class TransformerLanguageModel(MegatronModule):
    """``embedding`` (first stage) -> ``encoder`` -> ``output_layer`` (last stage, untied only).

    Returns the hidden states [s, b, h] of the encoder; the model on top computes logits.

    Args:
        config: transformer config.
        vocab_size: padded vocabulary size.
        max_sequence_length: rows of the position table.
        pre_process: build the embedding (first pipeline stage).
        post_process: build the final LayerNorm (and the untied output layer) (last stage).
        add_output_layer: build ``output_layer`` (ColumnParallelLinear h -> V, no bias) on the last stage.
        encoder_attn_mask_type: causal for GPT.
        num_tokentypes: token-type embeddings (0 for GPT).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, add_output_layer: bool = False,
                 encoder_attn_mask_type: AttnMaskType = AttnMaskType.causal, num_tokentypes: int = 0):
        super().__init__(config)
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embedding = Embedding(config, vocab_size, max_sequence_length, config.hidden_dropout,
                                       num_tokentypes=num_tokentypes)
        self.encoder = ParallelTransformer(config, pre_process=pre_process, post_process=post_process,
                                           self_attn_mask_type=encoder_attn_mask_type)
        if post_process and add_output_layer:
            with init_rng(OUTPUT_LAYER_INIT_KEY):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False)

    def set_input_tensor(self, input_tensor) -> None:
        """Input from the previous pipeline stage (a tensor or a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor for the encoder, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor], tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, s] ids -> encoder output [s, b, h] ([s/tp, b, h] with sequence parallelism)."""
        hidden_states = None
        if self.pre_process:
            hidden_states = self.embedding(input_ids, position_ids, tokentype_ids=tokentype_ids)
        return self.encoder(hidden_states, attention_mask)
