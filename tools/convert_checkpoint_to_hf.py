"""Export a Megatron legacy checkpoint (any TP/PP layout) as a Hugging Face GPT2LMHeadModel folder.

    python tools/convert_checkpoint_to_hf.py --load ckpt --output hf_model \
        [--iteration N] [--vocab-file vocab.json --merge-file merges.txt]

Writes config.json, model.safetensors (vocabulary padding trimmed) and, with the BPE files, the
tokenizer files, so ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` work
offline.
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.training.checkpoint_conversion import load_global_checkpoint, true_vocab_size  # noqa: E402
from megatron.training.checkpoint_hf import megatron_to_hf, write_tokenizer_files  # noqa: E402
from megatron.training.checkpoint_io import CheckpointError  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint directory.")
    p.add_argument("--output", required=True, help="Hugging Face output folder.")
    p.add_argument("--iteration", type=int, default=None, help="Iteration to export (default: latest).")
    p.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (also fixes the unpadded vocab size).")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt.")
    return p


def export(load: str, output: str, iteration=None, vocab_file=None, merge_file=None) -> str:
    """Library entry point of the tool; returns the output folder."""
    ckpt = load_global_checkpoint(load, iteration)
    vocab = true_vocab_size(ckpt.args)
    if vocab_file:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = len(json.load(f))
    vocab = vocab or ckpt.model["language_model.embedding.word_embeddings.weight"].shape[0]
    state, config = megatron_to_hf(ckpt.model, ckpt.args, vocab)
    from safetensors.torch import save_file

    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer_files(tmp, vocab_file, merge_file, config["n_positions"])
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(tmp, output)
    return output


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if bool(args.vocab_file) != bool(args.merge_file):
        print("convert_checkpoint_to_hf.py: error: give both --vocab-file and --merge-file", file=sys.stderr)
        return 2
    try:
        export(args.load, args.output, args.iteration, args.vocab_file, args.merge_file)
    except (CheckpointError, OSError) as err:  # user mistakes: one line, no traceback
        print(f"convert_checkpoint_to_hf.py: error: {err}", file=sys.stderr)
        return 2
    print(f"saved Hugging Face GPT2LMHeadModel to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
