"""Pretrain a GPT-2 model (Megatron-LM's entry point and flags).

    torchrun --nproc_per_node 2 pretrain_gpt.py --tensor-model-parallel-size 2 --num-layers 2 \
        --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 4 \
        --global-batch-size 8 --train-iters 50 --lr 1e-3 --mock-data --vocab-size 512

A thin file: the model, dataset and forward-step providers; megatron.training.pretrain does the rest.
"""

from functools import partial

import torch

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.training import get_args, get_tokenizer, pretrain
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.utils import average_losses_across_data_parallel_group, print_rank_0


def model_provider(pre_process=True, post_process=True):
    """Build this pipeline stage's GPT model."""
    args = get_args()
    config = core_transformer_config_from_args(args)
    print_rank_0("> building GPT model ...")
    return GPTModel(config, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process, parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)


def get_batch(data_iterator):
    """Next micro-batch, moved to this rank's device."""
    args = get_args()
    batch = next(data_iterator)
    batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"),
            batch["position_ids"])


def loss_func(loss_mask, output_tensor):
    """Mean loss over unmasked tokens; the DP-averaged value is reported as 'lm loss'."""
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
    averaged_loss = average_losses_across_data_parallel_group([loss])
    return loss, {"lm loss": averaged_loss[0]}


def forward_step(data_iterator, model):
    """Forward one micro-batch; returns the per-token losses and the loss function to apply."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Datasets sized [train, valid, test] samples: synthetic with --mock-data, else --data-path."""
    args = get_args()
    if args.mock_data:
        from megatron.core.datasets.mock_dataset import MockGPTDataset

        vocab = get_tokenizer().vocab_size
        # Same seed for every split: one learnable distribution, so validation loss falls with training.
        return tuple(MockGPTDataset(n, args.seq_length, vocab, seed=args.seed) if n > 0 else None
                     for n in train_val_test_num_samples)
    from megatron.training.datasets import build_gpt_datasets_from_args

    return build_gpt_datasets_from_args(args, get_tokenizer(), train_val_test_num_samples)


if __name__ == "__main__":
    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step)
