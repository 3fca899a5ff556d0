#!/usr/bin/env python
"""Train a GPT-2-style byte-level BPE on JSONL text; write GPT-2-format vocab.json and merges.txt.

Example::

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8192 --output-dir my-tokenizer

The vocabulary is laid out as GPT-2's: the 256 byte tokens first (in GPT-2's byte order), then one
token per merge in merge order, then ``<|endoftext|>`` last. The files load with
``--tokenizer-type GPT2BPETokenizer --vocab-file DIR/vocab.json --merge-file DIR/merges.txt`` here,
in Megatron-LM and in Hugging Face.
"""

import argparse
import json
import os
import sys
import tempfile
from typing import Iterable, Iterator, List, Tuple

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.training.tokenizer.gpt2_tokenization import EOD_TOKEN, bytes_to_unicode  # noqa: E402


def iter_jsonl_texts(paths: Iterable[str], json_keys: List[str]) -> Iterator[str]:
    """Yield the ``json_keys`` fields of every line of the JSONL files (clear error on a bad line)."""
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"--input {path} line {lineno}: not UTF-8 text ({e})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.strip())
                    texts = [obj[key] for key in json_keys]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"--input {path} line {lineno}: not a JSON object with keys {json_keys} "
                                     f"({type(e).__name__}: {e})") from None
                for key, text in zip(json_keys, texts):
                    if not isinstance(text, str):
                        raise ValueError(f"--input {path} line {lineno}: key {key!r} is not a string "
                                         "(see --json-keys)")
                    yield text


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tuple[dict, list]:
    """Train a byte-level BPE; return ``(vocab {token: id}, merges [(a, b)])`` in GPT-2 layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be at least 257 (256 bytes + {EOD_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        merges = load_merge_pairs(os.path.join(tmp, "merges.txt"))
    vocab = {}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    kept = []
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        kept.append((a, b))
    vocab[EOD_TOKEN] = len(vocab)
    return vocab, kept


def load_merge_pairs(path: str) -> List[Tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    return [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_gpt2_files(vocab: dict, merges: list, output_dir: str) -> Tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` (atomically) into ``output_dir``; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    vocab_path = os.path.join(output_dir, "vocab.json")
    merge_path = os.path.join(output_dir, "merges.txt")
    _atomic_write(vocab_path, json.dumps(vocab, ensure_ascii=False))
    _atomic_write(merge_path, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merge_path


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="final vocab size including <|endoftext|>")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--output-dir", required=True, help="directory for vocab.json and merges.txt")
    return p.parse_args(argv)


def main(argv=None):
    """Run the tool; a user mistake (bad JSONL line, too small --vocab-size, ...) exits with one stderr line."""
    args = get_args(argv)
    try:
        for path in args.input:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input {path}: no such file")
        vocab, merges = train_bpe(iter_jsonl_texts(args.input, args.json_keys), args.vocab_size,
                                  args.min_frequency)
        vocab_path, merge_path = save_gpt2_files(vocab, merges, args.output_dir)
    except (ValueError, OSError) as err:  # json.JSONDecodeError and UnicodeError are ValueErrors
        sys.exit(f"train_tokenizer.py: error: {err}")
    print(f"wrote {vocab_path} ({len(vocab)} tokens) and {merge_path} ({len(merges)} merges)")


if __name__ == "__main__":
    main()
