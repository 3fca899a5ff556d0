"""Start-up: flags, torch.distributed from torchrun / SLURM / a plain process, model-parallel groups, seeds.

Launch environments, in order of precedence:

* torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
* SLURM ``srun`` without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master address is the
  first host of SLURM_JOB_NODELIST (``scontrol show hostnames``), port derived from SLURM_JOB_ID
  unless MASTER_PORT is set;
* a plain ``python pretrain_gpt.py``: world size 1 on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.training import global_vars
from megatron.training.arguments import parse_args, validate_args
from megatron.training.utils import print_rank_0


@dataclass
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback without scontrol: "node[03-05,07],other" -> "node03".
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    return f"{prefix}{ranges.split(',')[0].split('-')[0]}{suffix}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_launch_env(environ=None) -> LaunchEnv:
    """Read rank / world / local rank / master address from torchrun, SLURM, or default to one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 0)) or 10000 + job_id % 50000
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def _initialize_distributed(args) -> None:
    """Create the default process group (unless one exists) and pick the device for this rank."""
    if dist.is_initialized():
        launch = LaunchEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           "", 0, "existing")
    else:
        launch = resolve_launch_env()
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    args.rank, args.local_rank = launch.rank, launch.local_rank
    backend = args.distributed_backend
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        args.device = torch.device("cuda", torch.cuda.current_device())
    else:
        args.device = torch.device("cpu")
    if launch.launcher != "existing":
        # env:// lets torchrun hand over its own rendezvous store (TORCHELASTIC_USE_AGENT_STORE).
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        dist.init_process_group(
            backend=backend, rank=launch.rank, world_size=launch.world_size, init_method="env://",
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             args.virtual_pipeline_model_parallel_size)
    print_rank_0(f"> initialized {launch.launcher} job: world size {dist.get_world_size()}, backend {backend}, "
                 f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
                 f"DP={args.data_parallel_size}, device {args.device.type}")


def set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and the TP RNG tracker; pipeline stages get distinct seeds (as Megatron)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _build_tokenizer(args):
    from megatron.training.tokenizer import build_tokenizer, vocab_size_with_padding

    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                                vocab_size=args.vocab_size)
    args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                                     args.tensor_model_parallel_size)
    print_rank_0(f"> {args.tokenizer_type}: vocab size {tokenizer.vocab_size}, padded to {args.padded_vocab_size}")
    global_vars.set_tokenizer(tokenizer)
    return tokenizer


def _world_size_hint() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return resolve_launch_env().world_size


def initialize_megatron(extra_args_provider: Optional[Callable] = None, args_defaults: Optional[dict] = None,
                        args_list: Optional[List[str]] = None):
    """Parse and validate flags, start torch.distributed and the parallel groups, seed, build the tokenizer.

    Returns the validated args (also available from ``megatron.training.global_vars.get_args()``).
    Flag mistakes raise :class:`megatron.training.arguments.ArgumentError` before any distributed work.
    """
    args = parse_args(extra_args_provider, args_list)
    args = validate_args(args, _world_size_hint(), args_defaults)
    global_vars.set_args(args)
    _initialize_distributed(args)
    set_random_seed(args.seed)
    _build_tokenizer(args)
    global_vars.set_tensorboard_writer(args)
    global_vars.set_signal_handler()
    return args
