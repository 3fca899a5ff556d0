"""Megatron-style tensor/pipeline/data-parallel training for GPT-2 and BERT transformers."""
