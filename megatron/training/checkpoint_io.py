"""Files of a Megatron-LM legacy checkpoint: paths, crash-safe writing, allowlisted loading.

Layout (DESIGN.md, checkpoint_version 3.0)::

    <dir>/latest_checkpointed_iteration.txt         "<iteration>" or "release", written last
    <dir>/iter_0000100/mp_rank_{tp:02d}/model_optim_rng.pt            PP size 1
    <dir>/iter_0000100/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   PP size > 1

A save goes to ``iter_XXXXXXX.tmp``; every file is fsynced, the directory is renamed into place and
only then the tracker file is replaced atomically. A process killed at any moment leaves the previous
checkpoint (and the tracker pointing to it) intact.

Loading uses ``torch.load(weights_only=True)`` with an explicit allowlist (:data:`SAFE_GLOBALS`);
anything else pickled in a file is refused with :class:`CheckpointError` before it can run.
This module imports only torch, numpy and the standard library (the tools use it too).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_TMP_SUFFIX = ".tmp"
_REPLACED_SUFFIX = ".replaced"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do."""


def _numpy_globals():
    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType", "UInt8DType")
                if hasattr(dtypes, n)]
    return out


# Non-tensor types a checkpoint may contain: the args Namespace and numpy's RNG state (Megatron-LM
# stores np.random.get_state()). Tensors, torch dtypes, containers and scalars are built in.
SAFE_GLOBALS = [argparse.Namespace] + _numpy_globals()


def checkpoint_dir_name(iteration: int, release: bool = False) -> str:
    """``iter_0000100`` (or ``release``)."""
    return "release" if release else f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """``mp_rank_{tp:02d}`` for PP size 1, ``mp_rank_{tp:02d}_{pp:03d}`` otherwise."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def get_checkpoint_name(checkpoints_path: str, iteration: int, tp_rank: int, pp_rank: int, pp_size: int,
                        release: bool = False) -> str:
    """Path of one (tp, pp) rank's ``model_optim_rng.pt``."""
    return os.path.join(checkpoints_path, checkpoint_dir_name(iteration, release),
                        rank_dir_name(tp_rank, pp_rank, pp_size), CHECKPOINT_FILENAME)


def get_checkpoint_tracker_filename(checkpoints_path: str) -> str:
    return os.path.join(checkpoints_path, TRACKER_FILENAME)


def read_tracker(checkpoints_path: str) -> Optional[Tuple[int, bool]]:
    """``(iteration, release)`` from the tracker file, or None when there is no checkpoint."""
    path = get_checkpoint_tracker_filename(checkpoints_path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    try:
        return int(text), False
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text[:40]!r}") from None


def find_layout(checkpoints_path: str, iteration: int, release: bool = False) -> Tuple[int, int]:
    """(TP size, PP size) of a saved iteration, from its ``mp_rank_*`` directory names."""
    base = os.path.join(checkpoints_path, checkpoint_dir_name(iteration, release))
    _restore_replaced(base)
    if not os.path.isdir(base):
        raise CheckpointError(f"checkpoint directory {base} does not exist")
    tps, pps = set(), set()
    for name in os.listdir(base):
        parts = name.split("_")
        if not name.startswith("mp_rank_") or len(parts) not in (3, 4):
            continue
        tps.add(int(parts[2]))
        pps.add(int(parts[3]) if len(parts) == 4 else 0)
    if not tps:
        raise CheckpointError(f"{base} holds no mp_rank_* directories")
    return max(tps) + 1, max(pps) + 1


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename, fsync the directory)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def temporary_save_dir(checkpoints_path: str, iteration: int, release: bool = False) -> str:
    return os.path.join(checkpoints_path, checkpoint_dir_name(iteration, release) + _TMP_SUFFIX)


def prepare_save(checkpoints_path: str, iteration: int, release: bool = False) -> str:
    """Create a clean temporary directory for one iteration (call on one rank, then barrier)."""
    os.makedirs(checkpoints_path, exist_ok=True)
    tmp = temporary_save_dir(checkpoints_path, iteration, release)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)  # debris of a save that was killed
    os.makedirs(tmp)
    return tmp


def write_rank_file(state: Dict[str, Any], checkpoints_path: str, iteration: int, tp_rank: int, pp_rank: int,
                    pp_size: int, release: bool = False) -> str:
    """torch.save one rank's state into the temporary directory and fsync it."""
    tmp = temporary_save_dir(checkpoints_path, iteration, release)
    rank_dir = os.path.join(tmp, rank_dir_name(tp_rank, pp_rank, pp_size))
    os.makedirs(rank_dir, exist_ok=True)
    path = os.path.join(rank_dir, CHECKPOINT_FILENAME)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(rank_dir)
    return path


def commit_save(checkpoints_path: str, iteration: int, release: bool = False) -> None:
    """Move the finished temporary directory into place, then point the tracker at it (one rank)."""
    tmp = temporary_save_dir(checkpoints_path, iteration, release)
    final = os.path.join(checkpoints_path, checkpoint_dir_name(iteration, release))
    _fsync_dir(tmp)
    replaced = None
    if os.path.exists(final):  # re-saving an iteration: keep the old one until the new one is in place
        replaced = final + _REPLACED_SUFFIX
        if os.path.exists(replaced):
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(checkpoints_path)
    atomic_write_text(get_checkpoint_tracker_filename(checkpoints_path), "release" if release else str(iteration))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _restore_replaced(final: str) -> None:
    """A kill between the two renames of a re-save leaves only ``<iter>.replaced``: put it back."""
    replaced = final + _REPLACED_SUFFIX
    if not os.path.exists(final) and os.path.isdir(replaced):
        try:
            os.rename(replaced, final)
        except OSError:
            pass


def save_sharded_checkpoint(checkpoints_path: str, iteration: int, shards: Dict[Tuple[int, int], Dict[str, Any]],
                            pp_size: int, release: bool = False) -> None:
    """Write every (tp, pp) shard from one process (tools, tests) with the same crash safety."""
    prepare_save(checkpoints_path, iteration, release)
    for (tp_rank, pp_rank), state in shards.items():
        write_rank_file(state, checkpoints_path, iteration, tp_rank, pp_rank, pp_size, release)
    commit_save(checkpoints_path, iteration, release)


def safe_load(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with the :data:`SAFE_GLOBALS` allowlist; refuse anything else.

    Raises:
        CheckpointError: the file is missing, or pickles a type outside the allowlist (the payload is
            never executed).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[-1] if first else "")
        raise CheckpointError(
            f"refusing to load {path}: it pickles an object outside the allowlist of tensors, containers, "
            f"argparse.Namespace and numpy arrays ({detail.strip()[:200]}); loading it could run code from the "
            "file. Re-save it from a trusted environment with plain tensors.") from None


def fsync_tree(path: str) -> None:
    """fsync every file and directory below ``path`` (used before a rename of a whole tree)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)
