"""megatron.core: the library (parallel state, tensor-parallel layers, models, data, optimizers)."""
