"""megatron.training: the application layer (flags, initialization, training loop, checkpoints, tokenizers)."""

from megatron.training.global_vars import get_args, get_tokenizer


def pretrain(*args, **kwargs):
    """Megatron-LM's entry point; see :func:`megatron.training.training.pretrain`."""
    from megatron.training.training import pretrain as _pretrain

    return _pretrain(*args, **kwargs)


__all__ = ["get_args", "get_tokenizer", "pretrain"]
