"""MegatronModule: base class holding the config, plus tied-embedding helpers for pipeline stages."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import WORD_EMBEDDINGS_INIT_KEY, init_rng


class MegatronModule(nn.Module):
    """Base of every transformer module; keeps ``self.config``.

    Models whose output layer is tied to the input embedding (GPT) also use
    :meth:`initialize_word_embeddings` / :meth:`shared_embedding_or_output_weight`: they expect
    ``self.pre_process``, ``self.post_process``, ``self.share_embeddings_and_output_weights``,
    ``self.vocab_size`` and ``self.language_model.embedding.word_embeddings`` (first stage).
    """

    def __init__(self, config: TransformerConfig, share_embeddings_and_output_weights: bool = True):
        super().__init__()
        self.config = config
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor) -> None:  # pragma: no cover - overridden where it matters
        raise NotImplementedError(f"{type(self).__name__} does not take pipeline input tensors")

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The word-embedding weight on the first stage, its copy ``word_embeddings_for_head`` on the last."""
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        if not self.share_embeddings_and_output_weights:
            raise RuntimeError("shared_embedding_or_output_weight() called on a model built with "
                               "--untie-embeddings-and-output-weights")
        return self.word_embeddings_for_head.weight

    def initialize_word_embeddings(self) -> None:
        """Tie the output layer to the input embedding across pipeline stages (Megatron-LM semantics).

        With one pipeline stage the output layer simply reuses the embedding weight. With more, the
        last stage gets ``word_embeddings_for_head`` (a zero-filled VocabParallelEmbedding-shaped
        weight flagged ``shared`` and ``shared_embedding``), and the first and last stages all-reduce
        it over the embedding group so it starts equal to the first stage's embedding. Afterwards the
        data-parallel/gradient code must all-reduce the grads of ``shared_embedding`` params over
        ``parallel_state.get_embedding_group()`` every step to keep the copies equal.
        """
        if not self.share_embeddings_and_output_weights:
            raise RuntimeError("initialize_word_embeddings() needs tied embeddings "
                               "(no --untie-embeddings-and-output-weights)")
        pp = (parallel_state.get_pipeline_model_parallel_world_size()
              if parallel_state.model_parallel_is_initialized() else 1)
        if pp == 1 and self.pre_process and self.post_process:
            self.shared_embedding_or_output_weight().zero_out_wgrad = True
            return
        if self.pre_process and not self.post_process:
            self.shared_embedding_or_output_weight().shared_embedding = True
        if self.post_process and not self.pre_process:
            with init_rng(WORD_EMBEDDINGS_INIT_KEY):  # overwritten below; drawn aside so other inits stay put
                self.word_embeddings_for_head = tensor_parallel.VocabParallelEmbedding(
                    self.vocab_size, self.config.hidden_size, init_method=self.config.init_method,
                    config=self.config)
            self.word_embeddings_for_head.weight.data.fill_(0)
            self.word_embeddings_for_head.weight.shared = True
            self.word_embeddings_for_head.weight.shared_embedding = True
        if dist.is_initialized() and pp > 1 and parallel_state.is_rank_in_embedding_group():
            weight = self.shared_embedding_or_output_weight()
            dist.all_reduce(weight.data, group=parallel_state.get_embedding_group())
