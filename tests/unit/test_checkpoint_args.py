"""--use-checkpoint-args fills only the flags the user left unset; a checkpoint padded for another TP size
fails with a message that names the re-pad command."""

import argparse

import pytest

from megatron.training.arguments import build_parser, parse_args
from megatron.training.checkpoint_io import CheckpointError, save_sharded_checkpoint
from megatron.training.checkpointing import check_checkpoint_args, load_args_from_checkpoint


def _saved_args(**kw):
    fields = dict(num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12, kv_channels=64,
                  max_position_embeddings=1024, seq_length=1024, padded_vocab_size=50304, true_vocab_size=50257,
                  make_vocab_size_divisible_by=128, layernorm_epsilon=1e-5, openai_gelu=True, bias_gelu_fusion=True,
                  untie_embeddings_and_output_weights=False, tensor_model_parallel_size=1)
    fields.update(kw)
    return argparse.Namespace(**fields)


def _checkpoint(tmp_path, saved):
    state = {"args": saved, "checkpoint_version": 3.0, "iteration": 0, "model": {}}
    save_sharded_checkpoint(str(tmp_path), 0, {(0, 0): state}, 1, release=True)
    return str(tmp_path)


def test_user_flags_win_over_checkpoint_args(tmp_path):
    load = _checkpoint(tmp_path, _saved_args(layernorm_epsilon=1e-6))
    args = parse_args(args_list=["--load", load, "--use-checkpoint-args", "--seq-length", "16",
                                 "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "1"])
    load_args_from_checkpoint(args)
    parser = build_parser()
    assert args.seq_length == 16  # explicit user value kept (was silently replaced by the checkpoint's 1024)
    assert args.make_vocab_size_divisible_by == 64  # non-default user value kept
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.max_position_embeddings) == (
        12, 768, 12, 1024)  # unset (None) -> from the checkpoint
    assert args.layernorm_epsilon == 1e-6 != parser.get_default("layernorm_epsilon")  # default -> checkpoint
    assert args.openai_gelu is True and parser.get_default("openai_gelu") is False


def test_padded_vocab_from_another_tp_names_the_repad_command(tmp_path):
    saved = _saved_args()  # 50257 tokens padded for TP=1 -> 50304
    now = _saved_args(padded_vocab_size=50432, tensor_model_parallel_size=2)  # what TP=2 needs
    path = str(tmp_path / "ck" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_args(saved, now, path)
    msg = str(err.value)
    assert "\n" not in msg and "50304" in msg and "50432" in msg
    assert f"tools/checkpoint_util.py --load {tmp_path / 'ck'}" in msg
    assert "--target-tensor-parallel-size 2 --true-vocab-size 50257" in msg
    assert "--use-checkpoint-args" not in msg  # that hint led nowhere: initialize recomputes the padding
    with pytest.raises(CheckpointError, match="--hidden-size 768 in the checkpoint vs 512 now"):
        check_checkpoint_args(saved, _saved_args(hidden_size=512), path)
