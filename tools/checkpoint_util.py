"""Reshard a Megatron legacy checkpoint to another tensor/pipeline-parallel layout.

    python tools/checkpoint_util.py --load ckpt_tp2 --save ckpt_tp1 \
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1

Merges QKV (per-head layout), column and row shards, re-pads the vocabulary for the new TP size
(needs the true vocabulary size: recorded in checkpoints saved here, else --true-vocab-size N or
--vocab-file vocab.json; without it a re-pad is refused), and
handles tied embeddings (``word_embeddings_for_head`` on the last stage when PP > 1). Optimizer state
(Adam moments, fp32 masters, loss scaler) and the scheduler are carried over when the checkpoint names
its optimizer params (checkpoints saved by this project); RNG states are dropped (load the result
with --no-load-rng).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.training.checkpoint_conversion import (  # noqa: E402
    load_global_checkpoint,
    repad_global,
    split_global_checkpoint,
)
from megatron.training.checkpoint_io import CheckpointError, save_sharded_checkpoint  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", "--load-dir", dest="load", required=True, help="Source checkpoint directory.")
    p.add_argument("--save", "--save-dir", dest="save", required=True, help="Output checkpoint directory.")
    p.add_argument("--target-tensor-parallel-size", type=int, required=True)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--iteration", type=int, default=None, help="Iteration to convert (default: latest).")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="Unpadded vocabulary size (when the checkpoint does not record it).")
    p.add_argument("--vocab-file", default=None,
                   help="GPT-2 vocab.json: its entry count is the unpadded vocabulary size.")
    p.add_argument("--no-optim", action="store_true", help="Drop the optimizer and scheduler state.")
    return p


def reshard(load: str, save: str, tp: int, pp: int, iteration=None, true_vocab_size=None, no_optim=False) -> None:
    """Library entry point of the tool (used by tests)."""
    if os.path.abspath(load) == os.path.abspath(save):
        raise CheckpointError("--save must differ from --load")
    ckpt = load_global_checkpoint(load, iteration)
    if no_optim:
        ckpt.optimizer, ckpt.opt_param_scheduler = None, None
    repad_global(ckpt, tp, true_vocab_size)
    shards = split_global_checkpoint(ckpt, tp, pp)
    save_sharded_checkpoint(save, ckpt.iteration, shards, pp, release=ckpt.release)


def count_vocab(vocab_file: str) -> int:
    """Entries of a GPT-2 ``vocab.json`` (the tokenizer's unpadded vocabulary size)."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            return len(json.load(f))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--vocab-file {vocab_file}: cannot read it as a vocab.json ({err})") from None


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        true_vocab = args.true_vocab_size
        if args.vocab_file:
            if true_vocab is not None:
                raise CheckpointError("give --true-vocab-size or --vocab-file, not both")
            true_vocab = count_vocab(args.vocab_file)
        if true_vocab is not None and true_vocab <= 0:
            raise CheckpointError(f"--true-vocab-size must be > 0 (got {true_vocab})")
        reshard(args.load, args.save, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                args.iteration, true_vocab, args.no_optim)
    except (CheckpointError, OSError) as err:
        print(f"checkpoint_util.py: error: {err}", file=sys.stderr)
        return 2
    print(f"saved TP={args.target_tensor_parallel_size} PP={args.target_pipeline_parallel_size} checkpoint "
          f"to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
