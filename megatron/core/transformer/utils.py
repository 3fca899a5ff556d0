"""Helpers for transformer modules: mask fill, GeLU variants, stage-local layer counts, init RNG streams."""

from __future__ import annotations

import contextlib
import math

import torch

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig


def attention_mask_func(attention_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Fill masked positions (True in ``attention_mask``) with -10000, as Megatron-LM does."""
    return attention_scores.masked_fill(attention_mask, -10000.0)


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU, tanh approximation (GPT-2's ``gelu_new``)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GeLU through erf."""
    return torch.nn.functional.gelu(x)


def default_device(config: TransformerConfig) -> torch.device:
    """Where parameters are created: the current CUDA device unless CPU init is asked for (as the TP layers)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _pp_state():
    """(pp world size, pp rank, vpp world size or None, vpp rank); (1, 0, None, None) without groups."""
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, None, None
    return (parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_rank())


def get_num_layers_to_build(config: TransformerConfig) -> int:
    """Layers held by this pipeline stage (this model chunk under the interleaved schedule)."""
    pp, _, vpp, _ = _pp_state()
    per_stage = config.num_layers // pp
    return per_stage // vpp if vpp is not None else per_stage


def get_layer_offset(config: TransformerConfig) -> int:
    """Global index of this stage's (chunk's) first layer, as Megatron-LM computes it."""
    pp, pp_rank, vpp, vpp_rank = _pp_state()
    local = get_num_layers_to_build(config)
    if vpp is not None:
        return (vpp_rank or 0) * (config.num_layers // vpp) + pp_rank * local
    return pp_rank * local


# Keys of the weight-init streams that are not transformer layers (layers use their global 1-based number).
WORD_EMBEDDINGS_INIT_KEY = 0
POSITION_EMBEDDINGS_INIT_KEY = 1_000_001
TOKENTYPE_EMBEDDINGS_INIT_KEY = 1_000_002
OUTPUT_LAYER_INIT_KEY = 1_000_003


@contextlib.contextmanager
def init_rng(key: int):
    """Draw weight inits from a stream derived from (default generator state, ``key``); leave that state as is.

    The base seed is peeked from the default generator without advancing it, and the body runs with
    the default (CPU and CUDA) generators seeded ``base + key``. So a module's initial weights depend
    only on the generator state when the model is built and on its key (a transformer layer's global
    layer number, or one of the ``*_INIT_KEY`` constants) -- not on which pipeline stage builds it or
    how much other stages drew before. Seed the default generator identically on every rank before
    building (``megatron.training`` does ``torch.manual_seed(--seed)``); TP-invariance is kept because
    the full master weight is still drawn and sliced. Dropout streams are untouched.
    """
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        base = int(torch.randint(0, 2**62, (1,)).item())  # peek: the state is restored on exit
        seed = (base + key) % 2**63
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # this device only (CUDA is initialised by current_device())
        yield
