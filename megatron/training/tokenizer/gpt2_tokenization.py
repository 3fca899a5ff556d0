"""GPT-2 byte-level BPE: file loading/validation, the pure-Python reference encoder, and a fast engine.

The reference (:class:`GPT2ReferenceBPE`) follows OpenAI's ``encoder.py``: text is split with GPT-2's
pre-tokenization regex, each piece is mapped byte-by-byte to printable unicode characters
(``bytes_to_unicode``) and merged greedily by merge rank. It is exact but slow; the fast engine
(:func:`build_fast_engine`, Hugging Face ``tokenizers`` BPE built from the same vocab and merges)
must give identical ids and is what preprocessing uses.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import regex

# GPT-2's pre-tokenization pattern (contractions, letters, numbers, other, whitespace).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOD_TOKEN = "<|endoftext|>"


@lru_cache
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_vocab(vocab_file: str) -> Dict[str, int]:
    """Read a GPT-2 ``vocab.json`` ({token: id}) and check it; raises one clear error per problem."""
    if not vocab_file:
        raise ValueError("GPT2BPETokenizer needs --vocab-file (a GPT-2 vocab.json)")
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"--vocab-file {vocab_file}: no such file")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--vocab-file {vocab_file}: not a GPT-2 vocab.json (invalid JSON: {e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"--vocab-file {vocab_file}: expected a non-empty JSON object {{token: id}}")
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise ValueError(f"--vocab-file {vocab_file}: token {bad[0]!r} has id {vocab[bad[0]]!r}, "
                         "expected a non-negative integer")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"--vocab-file {vocab_file}: two tokens share an id")
    missing = [c for c in bytes_to_unicode().values() if c not in vocab]
    if missing:
        raise ValueError(f"--vocab-file {vocab_file}: not a byte-level BPE vocab, {len(missing)} of the 256 "
                         f"byte tokens are missing (e.g. {missing[0]!r})")
    return vocab


def load_merges(merge_file: str, vocab: Dict[str, int]) -> List[Tuple[str, str]]:
    """Read a GPT-2 ``merges.txt`` (optional ``#version`` line, then ``a b`` per line) and check it."""
    if not merge_file:
        raise ValueError("GPT2BPETokenizer needs --merge-file (a GPT-2 merges.txt)")
    if not os.path.isfile(merge_file):
        raise FileNotFoundError(f"--merge-file {merge_file}: no such file")
    merges = []
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if (lineno == 1 and line.startswith("#version")) or not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"--merge-file {merge_file} line {lineno}: expected two tokens "
                                 f"separated by one space, got {line[:80]!r}")
            a, b = parts
            for tok in (a, b, a + b):
                if tok not in vocab:
                    raise ValueError(f"--merge-file {merge_file} line {lineno}: merge {a!r} {b!r} refers to "
                                     f"{tok!r}, which is not in the vocab file (mismatched vocab/merges?)")
            merges.append((a, b))
    return merges


class GPT2ReferenceBPE:
    """Pure-Python GPT-2 BPE (OpenAI's algorithm). Exact reference; slow."""

    def __init__(self, vocab: Dict[str, int], merges: List[Tuple[str, str]]):
        self.encoder = vocab
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(GPT2_PATTERN)
        self.cache: Dict[str, List[str]] = {}

    def bpe(self, token: str) -> List[str]:
        """Merge the characters of one pre-token by rank until no merge applies."""
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            new_word, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = new_word
        if len(self.cache) < 100_000:
            self.cache[token] = word
        return word

    def encode(self, text: str) -> List[int]:
        ids = []
        for piece in self.pat.findall(text):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(chars))
        return ids


def build_fast_engine(vocab: Dict[str, int], merges: List[Tuple[str, str]]) -> Optional[object]:
    """A Hugging Face ``tokenizers`` BPE with GPT-2's byte-level pre-tokenizer, or None if not installed.

    No special tokens are registered, so ``<|endoftext|>`` inside text is encoded as plain text, exactly
    as the reference does.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return None
    model = models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok
