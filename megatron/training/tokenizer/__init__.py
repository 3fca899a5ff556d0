"""Tokenizers: GPT-2 byte-level BPE and the Null (pre-tokenized ids) tokenizer."""

from megatron.training.tokenizer.tokenizer import (
    GPT2BPETokenizer,
    MegatronTokenizer,
    NullTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)

__all__ = ["GPT2BPETokenizer", "MegatronTokenizer", "NullTokenizer", "build_tokenizer",
           "vocab_size_with_padding"]
