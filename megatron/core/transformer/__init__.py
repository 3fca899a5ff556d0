"""Transformer building blocks: config, attention, MLP, layer, block, language model."""

from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["TransformerConfig"]
