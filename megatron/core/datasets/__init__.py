"""Datasets: Megatron .bin/.idx indexed datasets, GPT sample indices, blending, a mock dataset."""
