"""Fused kernels (softmax, layer norm, bias-GeLU, bias-dropout-add), each with a pure-torch fallback.

The CUDA kernels live in the optional extension ``megatron_fused_kernels`` built by ``setup.py`` from
``csrc/fused`` when a CUDA torch and nvcc are present. Every public module here works without it:
:func:`fused_kernels_available` tells whether the kernels can run, and the modules fall back to
plain torch ops when they cannot (no extension, CPU tensors, fusion switched off, unsupported shape).
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch

_EXT_NAME = "megatron_fused_kernels"
_ext = None
_ext_tried = False
_ext_error: Optional[str] = None


def load_fused_kernels():
    """Import the compiled extension once; returns the module or None (reason in :func:`load_error`)."""
    global _ext, _ext_tried, _ext_error
    if not _ext_tried:
        _ext_tried = True
        try:
            _ext = importlib.import_module(_EXT_NAME)  # torch is imported first (libc10.so)
        except ImportError as exc:
            _ext, _ext_error = None, f"{_EXT_NAME} not built ({exc})"
    return _ext


def load_error() -> Optional[str]:
    """Why the extension could not be imported (None when it was, or was never tried)."""
    return _ext_error


def fused_kernels_available() -> bool:
    """True when the CUDA extension is importable and a CUDA device is visible."""
    return load_fused_kernels() is not None and torch.cuda.is_available()


def fusion_status(masked_softmax_fusion: bool = True, bias_gelu_fusion: bool = True,
                  bias_dropout_fusion: bool = True, persist_layer_norm: bool = True) -> dict:
    """Which implementation each fused op will use on this machine, as short strings."""
    from megatron.core.fusions.fused_bias_gelu import compile_enabled

    kernels = fused_kernels_available()
    compiled = compile_enabled() and torch.cuda.is_available()
    status = {
        "softmax": "cuda kernel" if kernels and masked_softmax_fusion else "torch",
        "layer_norm": "cuda kernel" if kernels else "torch",
        "bias_gelu": "torch.compile" if compiled and bias_gelu_fusion else "torch eager",
        "bias_dropout_add": "torch.compile" if compiled and bias_dropout_fusion else "torch eager",
        "persist_layer_norm": str(persist_layer_norm),
    }
    if not kernels:
        status["kernels_unavailable"] = load_error() or "no CUDA device"
    return status


def log_fusion_status(logger: logging.Logger, **flags) -> str:
    """Log one start-up line saying which implementation each fused op uses; returns the line.

    Args:
        logger: where to log (INFO).
        **flags: ``masked_softmax_fusion``, ``bias_gelu_fusion``, ``bias_dropout_fusion``,
            ``persist_layer_norm`` as set on the command line (default True).
    """
    status = fusion_status(**flags)
    line = "fused ops: " + ", ".join(f"{k}={v}" for k, v in status.items())
    logger.info(line)
    return line
