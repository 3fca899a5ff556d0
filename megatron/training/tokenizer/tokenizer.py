"""Tokenizer construction (Megatron-LM names): ``build_tokenizer`` and ``vocab_size_with_padding``."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Dict, List, Optional

from megatron.training.tokenizer.gpt2_tokenization import (
    EOD_TOKEN,
    GPT2ReferenceBPE,
    build_fast_engine,
    bytes_to_unicode,
    load_merges,
    load_vocab,
)

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("GPT2BPETokenizer", "NullTokenizer")


class MegatronTokenizer(ABC):
    """Interface every tokenizer offers: ids in, text out, the EOD id and the vocabulary."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def vocab(self) -> Dict[str, int]: ...

    @property
    @abstractmethod
    def inv_vocab(self) -> Dict[int, str]: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @abstractmethod
    def tokenize(self, text: str) -> List[int]: ...

    @abstractmethod
    def detokenize(self, token_ids: List[int]) -> str: ...


class GPT2BPETokenizer(MegatronTokenizer):
    """GPT-2 byte-level BPE from a ``vocab.json`` and ``merges.txt``; EOD is ``<|endoftext|>``.

    Args:
        vocab_file: GPT-2 format vocab.json.
        merge_file: GPT-2 format merges.txt.
        engine: ``"auto"`` (fast Hugging Face ``tokenizers`` engine when installed, else the reference),
            ``"fast"`` (require it) or ``"reference"`` (pure Python, regex-based).
    """

    def __init__(self, vocab_file: str, merge_file: str, engine: str = "auto"):
        self.encoder = load_vocab(vocab_file)
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"--vocab-file {vocab_file}: has no {EOD_TOKEN} token (needed as end-of-document)")
        merges = load_merges(merge_file, self.encoder)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
        self.reference = GPT2ReferenceBPE(self.encoder, merges)
        if engine not in ("auto", "fast", "reference"):
            raise ValueError(f"GPT2BPETokenizer engine must be auto, fast or reference, got {engine!r}")
        self._fast = build_fast_engine(self.encoder, merges) if engine != "reference" else None
        if engine == "fast" and self._fast is None:
            raise ImportError("GPT2BPETokenizer(engine='fast') needs the `tokenizers` package: "
                              "pip install tokenizers")
        self.engine = "fast" if self._fast is not None else "reference"
        self._eod_id = self.encoder[EOD_TOKEN]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self.decoder

    @property
    def eod(self) -> int:
        return self._eod_id

    def tokenize(self, text: str) -> List[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self.reference.encode(text)

    def detokenize(self, token_ids: List[int]) -> str:
        try:
            chars = "".join(self.decoder[int(i)] for i in token_ids)
        except KeyError as e:
            raise ValueError(f"detokenize: token id {e.args[0]} is not in the vocabulary "
                             f"(size {self.vocab_size})") from None
        return bytearray(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")


class NullTokenizer(MegatronTokenizer):
    """Pre-tokenized text: ``"3 17 5"`` <-> ``[3, 17, 5]``. EOD is ``vocab_size``, so ``.vocab_size`` is
    ``vocab_size + 1`` (as in Megatron-LM)."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError(f"NullTokenizer needs --vocab-size > 0, got {vocab_size}")
        self._vocab_size_without_eod = int(vocab_size)
        self._eod_id = self._vocab_size_without_eod
        self._vocab: Optional[Dict[str, int]] = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def vocab(self) -> Dict[str, int]:
        if self._vocab is None:
            self._vocab = {str(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: s for s, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod_id

    def tokenize(self, text: str) -> List[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer expects space-separated integer ids, got {text[:60]!r}") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"NullTokenizer: id {i} outside [0, {self.vocab_size}) (--vocab-size "
                                 f"{self._vocab_size_without_eod})")
        return ids

    def detokenize(self, token_ids: List[int]) -> str:
        return " ".join(str(int(x)) for x in token_ids)


# Megatron-LM's private names, so code written against it ports over.
_GPT2BPETokenizer = GPT2BPETokenizer
_NullTokenizer = NullTokenizer


def build_tokenizer(tokenizer_type, vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> MegatronTokenizer:
    """Build a tokenizer by Megatron ``--tokenizer-type`` name.

    ``tokenizer_type`` may also be a parsed-arguments namespace (Megatron's ``build_tokenizer(args)``);
    then ``tokenizer_type``, ``vocab_file``, ``merge_file`` and ``vocab_size`` are read from it.
    """
    if not isinstance(tokenizer_type, str) and tokenizer_type is not None:
        args = tokenizer_type
        tokenizer_type = getattr(args, "tokenizer_type", None)
        vocab_file = getattr(args, "vocab_file", None)
        merge_file = getattr(args, "merge_file", None)
        vocab_size = getattr(args, "vocab_size", None)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {TOKENIZER_TYPES}")


def vocab_size_with_padding(orig_vocab_size: int, make_vocab_size_divisible_by: int,
                            tensor_model_parallel_size: int) -> int:
    """Pad the vocab to a multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size``."""
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    if multiple <= 0:
        raise ValueError("--make-vocab-size-divisible-by and --tensor-model-parallel-size must be positive")
    padded = -(-int(orig_vocab_size) // multiple) * multiple
    logger.info("padded vocab (size: %d) with %d dummy tokens (new size: %d)",
                orig_vocab_size, padded - orig_vocab_size, padded)
    return padded
