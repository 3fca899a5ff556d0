"""Save and load training checkpoints in Megatron-LM's legacy format (checkpoint_version 3.0).

``save_checkpoint(iteration, model, optimizer, opt_param_scheduler)`` is called by every rank; DP rank 0
of each (tp, pp) writes ``model_optim_rng.pt`` (model, optimizer with fp32 masters and loss scaler,
scheduler, RNG states of every DP rank, args). ``load_checkpoint(...) -> iteration`` restores all of it
according to --load / --ckpt-step / --finetune / --no-load-optim / --no-load-rng, so a resumed run
continues bit-identically. Files are written crash-safely and read with an allowlist
(:mod:`megatron.training.checkpoint_io`).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.training import global_vars
from megatron.training.checkpoint_conversion import flatten_model_state, nest_model_state
from megatron.training.checkpoint_io import (
    CHECKPOINT_VERSION,
    CheckpointError,
    commit_save,
    find_layout,
    get_checkpoint_name,
    prepare_save,
    read_tracker,
    safe_load,
    write_rank_file,
)
from megatron.training.utils import print_rank_0

logger = logging.getLogger(__name__)

# Fields compared between a checkpoint's args and this run's flags before any tensor is touched.
_SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
               "max_position_embeddings", "padded_vocab_size", "untie_embeddings_and_output_weights")
# Fields --use-checkpoint-args copies from the checkpoint (the model architecture).
_ARCH_ARGS = _SHAPE_ARGS + ("make_vocab_size_divisible_by", "openai_gelu", "bias_gelu_fusion", "layernorm_epsilon",
                            "apply_residual_connection_post_layernorm", "seq_length", "position_embedding_type")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _plain(value: Any) -> Any:
    """Parameters -> detached tensors, recursively (the file then holds only plain tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _storable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _storable(v) for k, v in value.items())
    return False


def checkpoint_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the run's args with only plain values (what Megatron-LM and the HF converters read)."""
    stored = argparse.Namespace(**{k: v for k, v in vars(args).items() if _storable(v)})
    tokenizer = global_vars.get_tokenizer()
    if tokenizer is not None and getattr(stored, "true_vocab_size", None) is None:
        stored.true_vocab_size = tokenizer.vocab_size
    return stored


def get_rng_state() -> List[Dict[str, Any]]:
    """This rank's RNG states, gathered over the data-parallel group (Megatron keeps one per DP rank)."""
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        gathered: List[Any] = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(gathered, state, group=parallel_state.get_data_parallel_group())
        return gathered
    return [state]


def set_rng_state(rng_states: List[Dict[str, Any]], path: str) -> None:
    """Restore this DP rank's RNG states (or the single saved ones)."""
    if isinstance(rng_states, dict):
        rng_states = [rng_states]
    dp_rank = parallel_state.get_data_parallel_rank()
    state = rng_states[dp_rank] if len(rng_states) > dp_rank else rng_states[0]
    try:
        random.setstate(state["random_rng_state"])
        np.random.set_state(state["np_rng_state"])
        torch.set_rng_state(state["torch_rng_state"])
        if "cuda_rng_state" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng_state"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
    except KeyError as err:
        raise CheckpointError(f"{path}: rng_state lacks {err}; load it with --no-load-rng") from None


def optimizer_param_names(model: List[torch.nn.Module], optimizer) -> List[List[str]]:
    """For each torch param group of ``optimizer``, the model key of each param (saved for the resharder)."""
    names = {}
    for i, chunk in enumerate(model):
        prefix = f"model{i}." if len(model) > 1 else ""
        for name, param in _unwrap(chunk).named_parameters():
            names[id(param)] = prefix + name
    for model_group, main_group in zip(getattr(optimizer, "float16_groups", []),
                                       getattr(optimizer, "fp32_from_float16_groups", [])):
        for model_param, main_param in zip(model_group, main_group):
            names[id(main_param)] = names.get(id(model_param), "?")
    inner = getattr(optimizer, "optimizer", optimizer)
    return [[names.get(id(p), "?") for p in group["params"]] for group in inner.param_groups]


def _model_state(model: List[torch.nn.Module]) -> Dict[str, Any]:
    if len(model) == 1:
        return {"model": nest_model_state(_unwrap(model[0]).state_dict())}
    return {f"model{i}": nest_model_state(_unwrap(m).state_dict()) for i, m in enumerate(model)}


def save_checkpoint(iteration: int, model, optimizer, opt_param_scheduler, args: Optional[argparse.Namespace] = None,
                    release: bool = False) -> None:
    """Save this run's state as ``<--save>/iter_{iteration:07d}`` (collective: every rank calls it)."""
    args = args or global_vars.get_args()
    model = model if isinstance(model, list) else [model]
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {args.save}")
    rng_state = None if args.no_save_rng else get_rng_state()
    if not dist.is_initialized() or dist.get_rank() == 0:
        prepare_save(args.save, iteration, release)
    _barrier()
    if parallel_state.get_data_parallel_rank() == 0:
        state: Dict[str, Any] = {
            "args": checkpoint_args(args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "consumed_train_samples": getattr(args, "consumed_train_samples", 0),
            "consumed_valid_samples": getattr(args, "consumed_valid_samples", 0)}
        state.update(_model_state(model))
        if not args.no_save_optim and optimizer is not None:
            state["optimizer"] = _plain(optimizer.state_dict())
            state["optimizer_param_names"] = optimizer_param_names(model, optimizer)
            if opt_param_scheduler is not None:
                state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
        if rng_state is not None:
            state["rng_state"] = _plain(rng_state)
        write_rank_file(state, args.save, iteration, parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_pipeline_model_parallel_world_size(), release)
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        commit_save(args.save, iteration, release)
    _barrier()
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {args.save}")


def _resolve_iteration(args, load_dir: str):
    if args.ckpt_step is not None:
        return args.ckpt_step, False
    found = read_tracker(load_dir)
    if found is None:
        if args.exit_on_missing_checkpoint:
            raise CheckpointError(f"--load {load_dir}: no {os.path.join(load_dir, 'latest_checkpointed_iteration.txt')}"
                                  " (--exit-on-missing-checkpoint); check the path")
        return None
    return found


def _vocab_mismatch(saved: argparse.Namespace, args: argparse.Namespace, path: str, load_dir: str) -> str:
    """The message for a checkpoint padded for another TP size (or tokenizer) than this run."""
    tokenizer = global_vars.get_tokenizer()
    true_vocab = getattr(tokenizer, "vocab_size", None) or getattr(saved, "true_vocab_size", None)
    tp = getattr(args, "tensor_model_parallel_size", 1)
    saved_tp = getattr(saved, "tensor_model_parallel_size", "?")
    divisible = getattr(args, "make_vocab_size_divisible_by", "?")
    return (f"{path}: the checkpoint's vocabulary is padded to {saved.padded_vocab_size} rows (saved at "
            f"tensor-parallel size {saved_tp}), but this run pads its tokenizer's {true_vocab} tokens to "
            f"{args.padded_vocab_size} (--make-vocab-size-divisible-by {divisible} x TP {tp}); re-pad it: "
            f"python tools/checkpoint_util.py --load {load_dir} --save NEW_DIR --target-tensor-parallel-size {tp} "
            f"--true-vocab-size {true_vocab if true_vocab else 'N'}")


def check_checkpoint_args(saved: argparse.Namespace, args: argparse.Namespace, path: str,
                          load_dir: Optional[str] = None) -> None:
    """Raise one clear error when the checkpoint's model shape differs from this run's flags."""
    diffs = []
    load_dir = load_dir or os.path.dirname(os.path.dirname(os.path.dirname(path)))
    for name in _SHAPE_ARGS:
        a, b = getattr(saved, name, None), getattr(args, name, None)
        if name == "padded_vocab_size":
            continue  # reported on its own below: the fix is a re-pad, not a model flag
        if a is not None and b is not None and a != b:
            diffs.append(f"--{name.replace('_', '-')} {a} in the checkpoint vs {b} now")
    if diffs:
        raise CheckpointError(f"{path} does not match this model: " + "; ".join(diffs) +
                              " (pass the checkpoint's values, or --use-checkpoint-args)")
    a, b = getattr(saved, "padded_vocab_size", None), getattr(args, "padded_vocab_size", None)
    if a is not None and b is not None and a != b:  # only the vocab padding differs: a TP re-pad fixes it
        raise CheckpointError(_vocab_mismatch(saved, args, path, load_dir))


def _load_model(model: List[torch.nn.Module], state: Dict[str, Any], path: str) -> None:
    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        if key not in state:
            raise CheckpointError(f"{path} has no '{key}' entry (saved with another virtual pipeline size?)")
        saved = flatten_model_state(state[key])
        target = _unwrap(chunk).state_dict()
        missing = [k for k in target if k not in saved]
        unexpected = [k for k in saved if k not in target]
        if missing or unexpected:
            raise CheckpointError(f"{path}: model keys differ (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                                  "was it saved with another model or TP/PP layout? "
                                  "Reshard it with tools/checkpoint_util.py")
        for k, v in target.items():
            if tuple(saved[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{path}: {k} has shape {tuple(saved[k].shape)} in the checkpoint, "
                                      f"{tuple(v.shape)} in this model; reshard with tools/checkpoint_util.py or "
                                      "fix the model flags")
        _unwrap(chunk).load_state_dict(saved, strict=True)


def _load_optimizer(model, optimizer, opt_param_scheduler, state, path) -> None:
    if "optimizer" not in state:
        raise CheckpointError(f"{path} has no optimizer state (saved with --no-save-optim?); "
                              "load it with --no-load-optim or --finetune")
    saved_names = state.get("optimizer_param_names")
    if saved_names is not None and saved_names != optimizer_param_names(model, optimizer):
        raise CheckpointError(f"{path}: the optimizer's parameters differ from this model's; "
                              "load with --no-load-optim or reshard with tools/checkpoint_util.py")
    optimizer.load_state_dict(state["optimizer"])
    if opt_param_scheduler is not None and "opt_param_scheduler" in state:
        try:
            opt_param_scheduler.load_state_dict(state["opt_param_scheduler"])
        except ValueError as err:  # a changed schedule flag: say which, and how to proceed
            raise CheckpointError(f"{path}: {err}") from None


def load_checkpoint(model, optimizer, opt_param_scheduler, load_arg: str = "load", strict: bool = True,
                    args: Optional[argparse.Namespace] = None) -> int:
    """Load ``<--load>`` into model/optimizer/scheduler/RNG; returns the iteration to resume from.

    Sets ``args.consumed_train_samples`` / ``consumed_valid_samples``. Returns 0 when there is no
    checkpoint (unless --exit-on-missing-checkpoint), with --finetune, or for a ``release`` checkpoint.

    Raises:
        CheckpointError: missing/unsafe files, a model shape or TP/PP layout that differs from the flags.
    """
    args = args or global_vars.get_args()
    model = model if isinstance(model, list) else [model]
    load_dir = getattr(args, load_arg)
    found = _resolve_iteration(args, load_dir)
    if found is None:
        print_rank_0(f"WARNING: no checkpoint found in --load {load_dir}; training from scratch")
        return 0
    iteration, release = found
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    saved_tp, saved_pp = find_layout(load_dir, iteration, release)
    if (saved_tp, saved_pp) != (tp, pp):
        raise CheckpointError(
            f"--load {load_dir} (iteration {iteration}) was saved with tensor-parallel size {saved_tp} and "
            f"pipeline-parallel size {saved_pp}, but this run uses {tp} and {pp}; reshard it: python "
            f"tools/checkpoint_util.py --load {load_dir} --save NEW_DIR --target-tensor-parallel-size {tp} "
            f"--target-pipeline-parallel-size {pp}")
    path = get_checkpoint_name(load_dir, iteration, parallel_state.get_tensor_model_parallel_rank(),
                               parallel_state.get_pipeline_model_parallel_rank(), pp, release)
    print_rank_0(f"loading checkpoint from {load_dir} at iteration {iteration}")
    state = safe_load(path)
    if "args" in state:
        check_checkpoint_args(state["args"], args, path, load_dir)
    _load_model(model, state, path)
    fresh = args.finetune or release
    if fresh:
        iteration = 0
    else:
        iteration = int(state.get("iteration", iteration))
        saved_args = state.get("args")
        args.consumed_train_samples = state.get("consumed_train_samples",
                                                getattr(saved_args, "consumed_train_samples", 0))
        args.consumed_valid_samples = state.get("consumed_valid_samples",
                                                getattr(saved_args, "consumed_valid_samples", 0))
    if not fresh and not args.no_load_optim and optimizer is not None:
        _load_optimizer(model, optimizer, opt_param_scheduler, state, path)
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 masters from the loaded weights
    if not fresh and not args.no_load_rng:
        if "rng_state" not in state:
            raise CheckpointError(f"{path} has no RNG state (saved with --no-save-rng?); load with --no-load-rng")
        set_rng_state(state["rng_state"], path)
    _barrier()
    print_rank_0(f"  successfully loaded checkpoint from {load_dir} at iteration {iteration}")
    return iteration


def load_args_from_checkpoint(args: argparse.Namespace, load_arg: str = "load") -> argparse.Namespace:
    """--use-checkpoint-args: fill the model architecture flags the user did not set from the checkpoint.

    A field is taken from the checkpoint only when its current value is None or the parser default, so an
    explicit non-default value on the command line (e.g. a shorter --seq-length for fine-tuning) wins; a
    shape flag that then differs from the checkpoint fails at load time with the usual mismatch error.
    """
    load_dir = getattr(args, load_arg)
    found = _resolve_iteration(args, load_dir)
    if found is None:
        return args
    iteration, release = found
    _, saved_pp = find_layout(load_dir, iteration, release)
    saved = safe_load(get_checkpoint_name(load_dir, iteration, 0, 0, saved_pp, release)).get("args")
    if saved is None:
        raise CheckpointError(f"--use-checkpoint-args: the checkpoint in {load_dir} stores no args")
    from megatron.training.arguments import build_parser

    parser = build_parser()
    kept = []
    for name in _ARCH_ARGS:
        value = getattr(saved, name, None)
        if value is None:
            continue
        current = getattr(args, name, None)
        if current is None or current == parser.get_default(name):
            setattr(args, name, value)
        elif current != value:
            kept.append(f"--{name.replace('_', '-')} {current} (checkpoint: {value})")
    if kept:
        print_rank_0("--use-checkpoint-args: keeping the values given on the command line: " + ", ".join(kept))
    return args
