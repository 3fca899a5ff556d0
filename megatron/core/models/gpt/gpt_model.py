"""GPTModel: GPT-2 (pre-LayerNorm, learned positions) with tied or untied vocab-parallel output and loss."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.language_model import TransformerLanguageModel, parallel_lm_logits
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class GPTModel(MegatronModule):
    """GPT-2 language model, split across tensor-parallel ranks (and pipeline stages).

    ``state_dict()`` keys are Megatron-LM's legacy checkpoint keys (without the leading ``model.``):
    ``language_model.embedding.{word,position}_embeddings.weight`` (first stage),
    ``language_model.encoder.layers.N.*`` (N local to the stage), ``language_model.encoder.final_layernorm.*``
    and ``language_model.output_layer.weight`` (untied) (last stage), ``word_embeddings_for_head.weight``
    (tied, last stage, PP > 1).

    Args:
        config: transformer config.
        vocab_size: padded vocabulary size (divisible by the TP size).
        max_sequence_length: rows of the position table (``--max-position-embeddings``).
        pre_process: this is the first pipeline stage (builds the embedding).
        post_process: this is the last pipeline stage (final LayerNorm, logits, loss).
        parallel_output: return logits split over the vocabulary ([b, s, V/tp]); False gathers [b, s, V].
        share_embeddings_and_output_weights: tie the output layer to the word embedding
            (False = ``--untie-embeddings-and-output-weights``).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, parallel_output: bool = True,
                 share_embeddings_and_output_weights: bool = True):
        super().__init__(config, share_embeddings_and_output_weights=share_embeddings_and_output_weights)
        if config.seq_length is not None and config.seq_length > max_sequence_length:
            raise ValueError(f"--seq-length ({config.seq_length}) must be <= --max-position-embeddings "
                             f"({max_sequence_length})")
        tp = config.tensor_model_parallel_size
        if vocab_size % tp != 0:
            raise ValueError(f"padded vocabulary size ({vocab_size}) must be divisible by "
                             f"--tensor-model-parallel-size ({tp}); pad it with --make-vocab-size-divisible-by")
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.fp16_lm_cross_entropy = config.fp16_lm_cross_entropy
        self.language_model = TransformerLanguageModel(
            config, vocab_size, max_sequence_length, pre_process=pre_process, post_process=post_process,
            add_output_layer=not share_embeddings_and_output_weights,
            encoder_attn_mask_type=AttnMaskType.causal)
        if share_embeddings_and_output_weights:
            self.initialize_word_embeddings()

    def set_input_tensor(self, input_tensor) -> None:
        """Input from the previous pipeline stage ([s, b, h] or a one-element list of it)."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the model.

        Args:
            input_ids: [b, s] token ids (first stage; may be None elsewhere).
            position_ids: [b, s] positions (first stage; may be None elsewhere).
            attention_mask: None (plain causal) or the complete bool mask [b|1, 1, s, s], True = masked out
                (including the causal part, as get_ltor_masks_and_position_ids builds it).
            labels: [b, s] next-token ids, or None.

        Returns:
            Last stage: logits [b, s, V/tp] ([b, s, V] when not parallel_output) if ``labels`` is None,
            else per-token loss [b, s] (float32). Other stages: hidden states [s, b, h]
            ([s/tp, b, h] with sequence parallelism) for the next stage.
        """
        hidden_states = self.language_model(input_ids, position_ids, attention_mask)  # [s, b, h]
        if not self.post_process:
            return hidden_states
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.language_model.output_layer.weight
        logits = parallel_lm_logits(hidden_states, weight, parallel_output=True,
                                    sequence_parallel=self.config.sequence_parallel)  # [s, b, V/tp]
        if labels is None:
            if not self.parallel_output:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)  # [s, b, V]
            return logits.transpose(0, 1).contiguous()  # [b, s, V/tp] or [b, s, V]
        labels = labels.transpose(0, 1).contiguous()  # [s, b]
        if not self.fp16_lm_cross_entropy:
            logits = logits.float()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]
