"""Import a Hugging Face GPT-2 folder as a Megatron legacy ``release`` checkpoint at any TP/PP layout.

    python tools/convert_hf_to_checkpoint.py --hf hf_model --save ckpt \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1

Then fine-tune with ``pretrain_gpt.py --load ckpt`` (a release checkpoint starts at iteration 0 with a
fresh optimizer; pass the model flags or --use-checkpoint-args).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

from megatron.training.checkpoint_conversion import (  # noqa: E402
    GlobalCheckpoint,
    padded_vocab_size,
    split_global_checkpoint,
)
from megatron.training.checkpoint_hf import hf_to_megatron  # noqa: E402
from megatron.training.checkpoint_io import CheckpointError, save_sharded_checkpoint  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="Hugging Face folder (config.json + model.safetensors).")
    p.add_argument("--save", required=True, help="Output checkpoint directory.")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    return p


def _read_hf(folder: str):
    if not os.path.isdir(folder):
        raise CheckpointError(f"--hf {folder}: no such folder")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"--hf {folder}: no config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st), config
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True), config
    raise CheckpointError(f"--hf {folder}: no model.safetensors or pytorch_model.bin")


def convert(hf: str, save: str, tp: int = 1, pp: int = 1, divisible_by: int = 128) -> None:
    """Library entry point of the tool."""
    sd, config = _read_hf(hf)
    padded = padded_vocab_size(config["vocab_size"], divisible_by, tp)
    model, fields = hf_to_megatron({k: v.float() for k, v in sd.items()}, config, padded)
    args = argparse.Namespace(**fields, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              make_vocab_size_divisible_by=divisible_by, tokenizer_type="GPT2BPETokenizer",
                              iteration=0, consumed_train_samples=0, consumed_valid_samples=0)
    shards = split_global_checkpoint(GlobalCheckpoint(args=args, model=model, release=True), tp, pp)
    save_sharded_checkpoint(save, 0, shards, pp, release=True)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        convert(args.hf, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                args.make_vocab_size_divisible_by)
    except (CheckpointError, OSError) as err:  # user mistakes: one line, no traceback
        print(f"convert_hf_to_checkpoint.py: error: {err}", file=sys.stderr)
        return 2
    print(f"saved release checkpoint to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
