"""Checkpoint layout conversion: merge any TP/PP checkpoint into global tensors and split it again.

Global form (:class:`GlobalCheckpoint`): one flat dict of full tensors with global layer numbers
(``language_model.encoder.layers.N.*``), the tied output weight folded into the word embedding, and,
when the checkpoint names its optimizer params (``optimizer_param_names``, written by this project),
the optimizer state per param name, so a resharded run continues with the same Adam moments.

Split rules (Megatron TP layers): column-parallel weights and biases (``query_key_value``,
``dense_h_to_4h``, ``word_embeddings``, ``output_layer``) concatenate along dim 0; row-parallel
weights (``self_attention.dense``, ``dense_4h_to_h``) along dim 1; everything else is replicated.
QKV rows are per head ``[heads, 3, head_dim]`` in every shard, so the dim-0 concatenation is the
global per-head layout and a split keeps whole heads per rank.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron.training.checkpoint_io import (
    CHECKPOINT_VERSION,
    CheckpointError,
    find_layout,
    get_checkpoint_name,
    read_tracker,
    safe_load,
)
from megatron.training.tokenizer.tokenizer import vocab_size_with_padding

logger = logging.getLogger(__name__)

_ENCODER = "language_model.encoder."
_LAYER_RE = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.*)$")
_COLUMN = ("word_embeddings.weight", "query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight",
           "dense_h_to_4h.bias", "output_layer.weight", "word_embeddings_for_head.weight")
_ROW = ("self_attention.dense.weight", "dense_4h_to_h.weight")
WORD_EMB = "language_model.embedding.word_embeddings.weight"
OUTPUT = "language_model.output_layer.weight"
HEAD = "word_embeddings_for_head.weight"
_VOCAB_KEYS = (WORD_EMB, OUTPUT)


def nest_model_state(flat: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Flat model keys -> Megatron's nested dicts (``language_model.encoder`` stays a flat dict)."""
    nested: Dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith(_ENCODER):
            nested.setdefault("language_model", {}).setdefault("encoder", {})[key[len(_ENCODER):]] = value
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def flatten_model_state(nested: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Inverse of :func:`nest_model_state` (also accepts an already flat dict)."""
    flat: Dict[str, torch.Tensor] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_model_state(value, name + "."))
        else:
            flat[name] = value
    return flat


def split_dim(key: str) -> Optional[int]:
    """Tensor-parallel split dimension of a model key: 0 (column), 1 (row) or None (replicated)."""
    if key.endswith(_COLUMN):
        return 0
    if key.endswith(_ROW):
        return 1
    return None


@dataclass
class GlobalCheckpoint:
    """A checkpoint with full (unsharded) tensors; see the module docstring."""

    args: argparse.Namespace
    model: Dict[str, torch.Tensor]
    iteration: int = 0
    release: bool = False
    optimizer: Optional[Dict[str, Dict[str, Any]]] = None  # name -> {"state", "master", "group"}
    optimizer_extra: Dict[str, Any] = field(default_factory=dict)  # grad_scaler, fp16 flag
    opt_param_scheduler: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # consumed samples


def _merge(tensors: List[torch.Tensor], dim: Optional[int]) -> torch.Tensor:
    return tensors[0] if dim is None or tensors[0].dim() == 0 else torch.cat(tensors, dim=dim)


def _stage_optimizer(state: Dict[str, Any]) -> Optional[Dict[str, Dict[str, Any]]]:
    """name -> {"state", "master", "group"} for one shard, or None when it cannot be mapped to names."""
    names = state.get("optimizer_param_names")
    opt = state.get("optimizer")
    if names is None or opt is None:
        return None
    fp16 = "fp32_from_fp16_params" in opt
    inner = opt["optimizer"] if fp16 else opt
    out = {}
    for g, group in enumerate(inner["param_groups"]):
        hparams = {k: v for k, v in group.items() if k != "params"}
        masters = opt["fp32_from_fp16_params"][g] if fp16 else None
        if masters is not None and len(masters) != len(group["params"]):
            return None  # mixed fp32/fp16 params: not mappable by position
        for j, idx in enumerate(group["params"]):
            out[names[g][j]] = {"state": inner["state"].get(idx, {}), "group": hparams,
                                "master": masters[j] if masters is not None else None}
    return out


def _global_name(local: str, offset: int) -> str:
    m = _LAYER_RE.match(local)
    return f"{_ENCODER}layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else local


def load_global_checkpoint(load_dir: str, iteration: Optional[int] = None) -> GlobalCheckpoint:
    """Read every (tp, pp) file of a checkpoint and merge them into full tensors."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such checkpoint directory")
    if iteration is None:
        found = read_tracker(load_dir)
        if found is None:
            raise CheckpointError(f"{load_dir}: no latest_checkpointed_iteration.txt; pass --iteration N")
        iteration, release = found
    else:
        release = False
    tp, pp = find_layout(load_dir, iteration, release)
    model: Dict[str, torch.Tensor] = {}
    optim: Optional[Dict[str, Dict[str, Any]]] = {}
    first, offset = None, 0
    for p in range(pp):
        shards = [safe_load(get_checkpoint_name(load_dir, iteration, t, p, pp, release)) for t in range(tp)]
        first = first or shards[0]
        flats = [flatten_model_state(s["model"]) for s in shards]
        stage_layers = {int(m.group(1)) for k in flats[0] for m in [_LAYER_RE.match(k)] if m}
        for key in flats[0]:
            if key == HEAD and WORD_EMB in model:
                continue  # the tied copy on the last stage equals the first stage's embedding
            gname = WORD_EMB if key == HEAD else _global_name(key, offset)
            model[gname] = _merge([f[key] for f in flats], split_dim(key))
        stage_opts = [_stage_optimizer(s) for s in shards]
        if optim is not None and all(o is not None for o in stage_opts):
            for name in stage_opts[0]:
                gname = WORD_EMB if name == HEAD else _global_name(name, offset)
                if name == HEAD and WORD_EMB in optim:
                    continue
                dim = split_dim(name)
                entries = [o[name] for o in stage_opts]
                optim[gname] = {
                    "group": entries[0]["group"],
                    "state": {k: _merge([e["state"][k] for e in entries], dim) if torch.is_tensor(v) else v
                              for k, v in entries[0]["state"].items()},
                    "master": None if entries[0]["master"] is None else _merge([e["master"] for e in entries], dim)}
        else:
            optim = None
        offset += len(stage_layers)
    extra_opt = {}
    if optim is not None and "optimizer" in first:
        opt = first["optimizer"]
        extra_opt = {"fp16": "fp32_from_fp16_params" in opt, "grad_scaler": opt.get("grad_scaler")}
    elif "optimizer" in first:
        logger.warning("%s: optimizer state has no param names (not saved by this project); dropping it", load_dir)
    extra = {k: first[k] for k in ("consumed_train_samples", "consumed_valid_samples") if k in first}
    args = copy.copy(first["args"])
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp  # the layout on disk
    return GlobalCheckpoint(args=args, model=model, iteration=int(first.get("iteration", 0)),
                            release=release, optimizer=optim, optimizer_extra=extra_opt,
                            opt_param_scheduler=first.get("opt_param_scheduler"), extra=extra)


# Megatron's padding (a multiple of divisible_by * tp); one implementation, shared with training.
padded_vocab_size = vocab_size_with_padding


def repad_vocab(tensor: torch.Tensor, true_vocab: int, new_rows: int, fill_last_row: bool = True) -> torch.Tensor:
    """Trim the vocabulary rows to ``true_vocab`` and pad to ``new_rows`` (copies of the last true row,
    as Megatron's checkpoint_util does; zeros for optimizer moments with ``fill_last_row=False``)."""
    if tensor.dim() == 0:
        return tensor
    trimmed = tensor[:true_vocab]
    pad = new_rows - true_vocab
    if pad <= 0:
        return trimmed[:new_rows].clone()
    rest = trimmed.shape[1:]
    filler = trimmed[-1:].expand(pad, *rest) if fill_last_row else trimmed.new_zeros(pad, *rest)
    return torch.cat([trimmed, filler], dim=0)


def true_vocab_size(args: argparse.Namespace) -> Optional[int]:
    """The unpadded vocabulary size if the checkpoint's args record it."""
    for name in ("true_vocab_size",):
        if getattr(args, name, None):
            return int(getattr(args, name))
    return None


def repad_global(ckpt: GlobalCheckpoint, target_tp: int, true_vocab: Optional[int] = None) -> None:
    """Re-pad the vocabulary rows in place for ``target_tp`` (no-op when the padded size is unchanged)."""
    args = ckpt.args
    old = ckpt.model[WORD_EMB].shape[0]
    true_vocab = true_vocab or true_vocab_size(args)
    divisible = int(getattr(args, "make_vocab_size_divisible_by", None) or 128)
    if true_vocab is None:
        # The true size lies in (old - divisible * source_tp, old]; without it the padding can only stay as is,
        # and only when that is exactly what the target TP would compute for every possible true size.
        source_tp = int(getattr(args, "tensor_model_parallel_size", None) or 1)
        lowest = max(1, old - divisible * source_tp + 1)
        if padded_vocab_size(lowest, divisible, target_tp) != old:
            raise CheckpointError(
                f"the checkpoint does not record its true vocabulary size, and its {old} padded rows (TP={source_tp}, "
                f"--make-vocab-size-divisible-by {divisible}) need re-padding for TP={target_tp}; pass "
                "--true-vocab-size N (or --vocab-file vocab.json to count it)")
        new = old
    else:
        if true_vocab > old:
            raise CheckpointError(f"--true-vocab-size {true_vocab} exceeds the checkpoint's {old} vocabulary rows")
        new = padded_vocab_size(true_vocab, divisible, target_tp)
        args.true_vocab_size = true_vocab
    if new != old:
        for key in _VOCAB_KEYS:
            if key in ckpt.model:
                ckpt.model[key] = repad_vocab(ckpt.model[key], true_vocab, new)
            if ckpt.optimizer and key in ckpt.optimizer:
                entry = ckpt.optimizer[key]
                entry["state"] = {k: repad_vocab(v, true_vocab, new, False) if torch.is_tensor(v) and v.dim() else v
                                  for k, v in entry["state"].items()}
                if entry["master"] is not None:
                    entry["master"] = repad_vocab(entry["master"], true_vocab, new)
    args.padded_vocab_size = new


def _chunk(tensor: torch.Tensor, dim: Optional[int], tp: int, rank: int) -> torch.Tensor:
    if dim is None or tensor.dim() == 0:
        return tensor.clone()
    if tensor.shape[dim] % tp:
        raise CheckpointError(f"dimension {dim} of size {tensor.shape[dim]} does not split over TP={tp}")
    return torch.chunk(tensor, tp, dim=dim)[rank].clone()


def stage_model_keys(global_keys: List[str], num_layers: int, pp: int, p: int, tied: bool) -> List[Tuple[str, str]]:
    """(local key, global key) pairs of pipeline stage ``p`` in the model's parameter order."""
    per = num_layers // pp
    out = []
    for key in global_keys:
        m = _LAYER_RE.match(key)
        if m:
            layer = int(m.group(1))
            if p * per <= layer < (p + 1) * per:
                out.append((f"{_ENCODER}layers.{layer - p * per}.{m.group(2)}", key))
        elif key.startswith("language_model.embedding."):
            if p == 0:
                out.append((key, key))
        elif p == pp - 1:
            out.append((key, key))
    if tied and pp > 1 and p == pp - 1:
        out.append((HEAD, WORD_EMB))
    return out


def _shard_optimizer(ckpt: GlobalCheckpoint, pairs, tp: int, t: int) -> Dict[str, Any]:
    groups: Dict[Any, Dict[str, Any]] = {}
    state, masters, names = {}, {}, {}
    for idx, (local, gname) in enumerate(pairs):
        entry = ckpt.optimizer[gname]
        key = repr(sorted((k, repr(v)) for k, v in entry["group"].items()))
        group = groups.setdefault(key, {"hparams": entry["group"], "params": []})
        group["params"].append(idx)
        names.setdefault(key, []).append(local)
        dim = split_dim(local)
        state[idx] = {k: _chunk(v, dim, tp, t) if torch.is_tensor(v) else v for k, v in entry["state"].items()}
        if entry["master"] is not None:
            masters[idx] = _chunk(entry["master"], dim, tp, t)
    param_groups = [dict(g["hparams"], params=g["params"]) for g in groups.values()]
    torch_sd = {"state": state, "param_groups": param_groups}
    if ckpt.optimizer_extra.get("fp16"):
        masters_by_group = [[masters[i] for i in g["params"]] for g in groups.values()]
        optimizer: Dict[str, Any] = {"optimizer": torch_sd, "fp32_from_fp16_params": masters_by_group}
        if ckpt.optimizer_extra.get("grad_scaler") is not None:
            optimizer["grad_scaler"] = ckpt.optimizer_extra["grad_scaler"]
    else:
        optimizer = torch_sd
    return {"optimizer": optimizer, "optimizer_param_names": [names[k] for k in groups]}


def split_global_checkpoint(ckpt: GlobalCheckpoint, tp: int, pp: int) -> Dict[Tuple[int, int], Dict[str, Any]]:
    """Full tensors -> ``{(tp_rank, pp_rank): model_optim_rng state}`` for a TP x PP layout (no RNG)."""
    args = copy.copy(ckpt.args)
    num_layers = int(args.num_layers)
    if num_layers % pp:
        raise CheckpointError(f"--num-layers {num_layers} is not divisible by target pipeline size {pp}")
    heads = int(args.num_attention_heads)
    if heads % tp:
        raise CheckpointError(f"--num-attention-heads {heads} is not divisible by target tensor-parallel size {tp}")
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.padded_vocab_size = ckpt.model[WORD_EMB].shape[0]
    tied = OUTPUT not in ckpt.model
    keys = list(ckpt.model)
    shards = {}
    for p in range(pp):
        pairs = stage_model_keys(keys, num_layers, pp, p, tied)
        for t in range(tp):
            flat = {local: _chunk(ckpt.model[g], split_dim(local), tp, t) for local, g in pairs}
            state: Dict[str, Any] = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                                     "iteration": ckpt.iteration, "model": nest_model_state(flat)}
            state.update(ckpt.extra)
            if ckpt.optimizer is not None:
                state.update(_shard_optimizer(ckpt, pairs, tp, t))
                if ckpt.opt_param_scheduler is not None:
                    state["opt_param_scheduler"] = ckpt.opt_param_scheduler
            shards[(t, p)] = state
    return shards
