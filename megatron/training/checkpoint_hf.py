"""Hugging Face GPT2LMHeadModel <-> global (unsharded) Megatron GPT tensors.

HF GPT-2 uses Conv1D ([in, out]) weights and a fused ``c_attn`` whose columns are ``[q | k | v]``
(each [heads * head_dim]); Megatron's ``query_key_value`` rows are per head ``[heads, 3, head_dim]``.
Activation mapping (as Megatron's converters): tanh GeLU (``--openai-gelu`` or the fused bias-GeLU,
which is the tanh form) <-> ``gelu_new``; erf GeLU <-> ``gelu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from megatron.training.checkpoint_io import CheckpointError

logger = logging.getLogger(__name__)

_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_L = "language_model.encoder.layers.{}."


def _qkv_to_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads*3*hd, ...] per-head rows -> [3*heads*hd, ...] (q block, k block, v block)."""
    hd = weight.shape[0] // (3 * heads)
    rest = weight.shape[1:]
    return weight.reshape(heads, 3, hd, *rest).transpose(0, 1).reshape(3 * heads * hd, *rest)


def _qkv_from_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    hd = weight.shape[0] // (3 * heads)
    rest = weight.shape[1:]
    return weight.reshape(3, heads, hd, *rest).transpose(0, 1).reshape(3 * heads * hd, *rest)


# One transformer layer, both directions: (our name under layers.N., HF name under h.N., how it changes).
# "t": HF Conv1D stores [in, out], the transpose of our [out, in]; "qkv": per-head rows <-> q|k|v blocks.
_LAYER_MAP = (
    ("input_layernorm.weight", "ln_1.weight", None),
    ("input_layernorm.bias", "ln_1.bias", None),
    ("post_attention_layernorm.weight", "ln_2.weight", None),
    ("post_attention_layernorm.bias", "ln_2.bias", None),
    ("self_attention.query_key_value.weight", "attn.c_attn.weight", "qkv+t"),
    ("self_attention.query_key_value.bias", "attn.c_attn.bias", "qkv"),
    ("self_attention.dense.weight", "attn.c_proj.weight", "t"),
    ("self_attention.dense.bias", "attn.c_proj.bias", None),
    ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", "t"),
    ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", None),
    ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", "t"),
    ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", None),
)


def _layer_tensor_to_hf(t: torch.Tensor, kind: Optional[str], heads: int) -> torch.Tensor:
    if kind in ("qkv", "qkv+t"):
        t = _qkv_to_hf(t, heads)
    return t.t() if kind in ("t", "qkv+t") else t


def _layer_tensor_from_hf(t: torch.Tensor, kind: Optional[str], heads: int) -> torch.Tensor:
    if kind in ("t", "qkv+t"):
        t = t.t()
    return _qkv_from_hf(t, heads) if kind in ("qkv", "qkv+t") else t


def hf_activation(args: argparse.Namespace) -> str:
    """HF ``activation_function`` for a Megatron run's GeLU flags."""
    tanh = bool(getattr(args, "openai_gelu", False)) or bool(getattr(args, "bias_gelu_fusion", False))
    return "gelu_new" if tanh else "gelu"


def megatron_to_hf(model: Dict[str, torch.Tensor], args: argparse.Namespace,
                   vocab_size: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Global Megatron tensors -> (HF GPT2LMHeadModel state dict, config.json dict); vocab rows trimmed."""
    if getattr(args, "apply_residual_connection_post_layernorm", False):
        raise CheckpointError("--apply-residual-connection-post-layernorm models have no GPT-2 equivalent")
    heads, layers, hidden = int(args.num_attention_heads), int(args.num_layers), int(args.hidden_size)
    kv = getattr(args, "kv_channels", None)
    qkv_rows = model[_L.format(0) + "self_attention.query_key_value.weight"].shape[0] if layers else 3 * hidden
    if (kv is not None and int(kv) * heads != hidden) or qkv_rows != 3 * hidden:
        head_dim = int(kv) if kv is not None else qkv_rows // (3 * heads)
        raise CheckpointError(f"--kv-channels {head_dim} x --num-attention-heads {heads} = {head_dim * heads} differs "
                              f"from --hidden-size {hidden}; Hugging Face GPT-2 needs heads * head dim == hidden size, "
                              "so this model cannot be exported")
    sd = {"transformer.wte.weight": model["language_model.embedding.word_embeddings.weight"][:vocab_size],
          "transformer.wpe.weight": model["language_model.embedding.position_embeddings.weight"]}
    for i in range(layers):
        src, dst = _L.format(i), f"transformer.h.{i}."
        for ours, theirs, kind in _LAYER_MAP:
            sd[dst + theirs] = _layer_tensor_to_hf(model[src + ours], kind, heads)
    sd["transformer.ln_f.weight"] = model["language_model.encoder.final_layernorm.weight"]
    sd["transformer.ln_f.bias"] = model["language_model.encoder.final_layernorm.bias"]
    tied = "language_model.output_layer.weight" not in model
    if not tied:
        sd["lm_head.weight"] = model["language_model.output_layer.weight"][:vocab_size]
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    dtype = sd["transformer.wte.weight"].dtype  # config.json's torch_dtype: what the tensors are stored in
    mixed = sorted({str(v.dtype) for v in sd.values() if v.dtype != dtype})
    if mixed:
        logger.warning("exported tensors mix %s with %s; config.json says %s", dtype, mixed, dtype)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": int(args.max_position_embeddings), "n_ctx": int(args.max_position_embeddings),
        "n_embd": hidden, "n_layer": layers, "n_head": heads,
        "n_inner": int(getattr(args, "ffn_hidden_size", None) or 4 * hidden),
        "activation_function": hf_activation(args),
        "layer_norm_epsilon": float(getattr(args, "layernorm_epsilon", 1e-5)),
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "scale_attn_weights": True, "tie_word_embeddings": tied,
        "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1,
        "torch_dtype": str(dtype).replace("torch.", ""),  # the exported tensors' dtype
    }
    return sd, config


def hf_to_megatron(sd: Dict[str, torch.Tensor], config: dict,
                   padded_vocab: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    """HF GPT-2 state dict + config -> (global Megatron tensors with zero-padded vocab, args fields)."""
    if config.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"only GPT-2 models convert; config.json has model_type {config.get('model_type')}")
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    heads, layers, hidden = config["n_head"], config["n_layer"], config["n_embd"]
    wte = sd["wte.weight"]
    vocab = wte.shape[0]

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - vocab, t.shape[1])]) if padded_vocab > vocab else t

    model = {"language_model.embedding.word_embeddings.weight": pad(wte),
             "language_model.embedding.position_embeddings.weight": sd["wpe.weight"]}
    for i in range(layers):
        src, dst = f"h.{i}.", _L.format(i)
        for ours, theirs, kind in _LAYER_MAP:
            model[dst + ours] = _layer_tensor_from_hf(sd[src + theirs], kind, heads)
    model["language_model.encoder.final_layernorm.weight"] = sd["ln_f.weight"]
    model["language_model.encoder.final_layernorm.bias"] = sd["ln_f.bias"]
    tied = config.get("tie_word_embeddings", True)
    if not tied:
        model["language_model.output_layer.weight"] = pad(sd["lm_head.weight"])
    model = {k: v.detach().contiguous().clone() for k, v in model.items()}
    tanh = config.get("activation_function", "gelu_new") in _TANH
    if not tanh and config.get("activation_function") != "gelu":
        raise CheckpointError(f"activation_function {config.get('activation_function')!r} has no Megatron equivalent")
    ffn = config.get("n_inner") or 4 * hidden
    fields = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
                  kv_channels=hidden // heads, max_position_embeddings=config["n_positions"],
                  seq_length=config["n_positions"], true_vocab_size=vocab, padded_vocab_size=padded_vocab,
                  openai_gelu=tanh, bias_gelu_fusion=tanh, layernorm_epsilon=config.get("layer_norm_epsilon", 1e-5),
                  untie_embeddings_and_output_weights=not tied, apply_residual_connection_post_layernorm=False,
                  position_embedding_type="learned_absolute", params_dtype=torch.float32, fp16=False, bf16=False)
    return model, fields


def write_tokenizer_files(out_dir: str, vocab_file: Optional[str], merge_file: Optional[str], max_len: int) -> bool:
    """Copy GPT-2 BPE files so ``AutoTokenizer.from_pretrained(out_dir)`` works offline."""
    if not vocab_file or not merge_file:
        return False
    for src in (vocab_file, merge_file):
        if not os.path.isfile(src):
            raise CheckpointError(f"tokenizer file {src} does not exist")
    shutil.copyfile(vocab_file, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(merge_file, os.path.join(out_dir, "merges.txt"))
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    eod = "<|endoftext|>" if "<|endoftext|>" in vocab else max(vocab, key=vocab.get)
    special = {"bos_token": eod, "eos_token": eod, "unk_token": eod}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=max_len, add_prefix_space=False), f,
                  indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return True
