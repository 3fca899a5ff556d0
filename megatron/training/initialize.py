"""Start-up: flags, torch.distributed from torchrun / SLURM / a plain process, model-parallel groups, seeds.

Launch environments, in order of precedence:

* torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
* SLURM ``srun`` without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master address is the
  first host of SLURM_JOB_NODELIST (``scontrol show hostnames``), port derived from SLURM_JOB_ID
  unless MASTER_PORT is set;
* a plain ``python pretrain_gpt.py``: world size 1 on 127.0.0.1.

A job with more than one rank also runs a liveness monitor (:class:`JobLivenessMonitor`): every rank
heart-beats into the rendezvous store, rank 0 watches everyone (rank 1 watches rank 0), and a rank that
dies, hangs or raises makes every rank exit non-zero within ``--distributed-timeout-minutes`` with a
message naming it, instead of the job hanging in a collective.
"""

from __future__ import annotations

import atexit
import datetime
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.training import global_vars
from megatron.training.arguments import ArgumentError, parse_args, validate_args
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
    # SLURM: only inside an srun step (SLURM_STEP_ID set). A plain `python pretrain_gpt.py` in the batch
    # script itself also sees SLURM_NTASKS but is one process, and must not wait for ranks that never come.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        job_id = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 0)) or 10000 + job_id % 50000
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")))
        return LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


_DONE = 1 << 40  # added to a rank's heartbeat counter when it exits cleanly
_ABORT_KEY = "abort"


def _hb_key(rank: int) -> str:
    return f"hb/{rank}"


class JobLivenessMonitor:
    """Turn a dead, hung or failed rank into a prompt non-zero exit of every rank, with its name.

    Every rank increments ``hb/<rank>`` in the job's rendezvous store (its own client connection,
    under a private prefix) every ``interval`` seconds from a daemon thread and polls an ``abort`` key.
    Rank 0 reads all heartbeats (rank 1 reads rank 0's); a rank whose counter has not moved for
    ``timeout`` seconds and that has not exited cleanly is declared dead: the watcher writes the reason
    to ``abort`` and exits with status 1, and every other rank sees the key and exits too. An uncaught
    exception on a rank is published the same way (naming the rank, or, for a failed collective, the
    peers that stopped heart-beating). Losing the store itself (its host died) aborts after ``timeout``.

    Args:
        rank: this process's global rank.
        world_size: number of ranks in the job.
        master_addr: host of the rendezvous store (MASTER_ADDR).
        master_port: its port (MASTER_PORT).
        timeout: seconds without a heartbeat before a rank counts as dead (--distributed-timeout-minutes).
        interval: seconds between heartbeats (default: timeout / 10, between 0.2 and 2 s).
        exit_func: called with the exit status to abort (default ``os._exit``; tests replace it).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, timeout: float,
                 interval: Optional[float] = None, exit_func: Callable[[int], None] = os._exit):
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.interval = interval if interval is not None else min(2.0, max(0.2, self.timeout / 10))
        self.exit_func = exit_func
        prefix = f"megatron/liveness/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        client = dist.TCPStore(master_addr, master_port, is_master=False,
                               timeout=datetime.timedelta(seconds=max(10.0, self.timeout)))
        self.store = dist.PrefixStore(prefix, client)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watched = list(range(world_size)) if rank == 0 else ([0] if rank == 1 else [])
        self._last_value = {r: -1 for r in self._watched}
        self._last_change = {r: time.monotonic() for r in self._watched}
        self._store_lost_since: Optional[float] = None
        self.store.add(_hb_key(rank), 1)
        self._thread = threading.Thread(target=self._run, name="megatron-liveness", daemon=True)

    def start(self) -> JobLivenessMonitor:
        self._thread.start()
        return self

    # -- the background loop -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    self.store.add(_hb_key(self.rank), 1)
                    if self.store.check([_ABORT_KEY]):
                        self._abort(self.store.get(_ABORT_KEY).decode(), publish=False)
                        return
                    dead = self._stale_ranks(self.timeout)
                self._store_lost_since = None
            except Exception as err:  # the store host is gone (or unreachable)
                now = time.monotonic()
                self._store_lost_since = self._store_lost_since or now
                if now - self._store_lost_since > self.timeout:
                    self._abort(f"lost the rendezvous store for {now - self._store_lost_since:.0f} s ({err}); "
                                "the rank hosting it (rank 0 or the launcher) probably died", publish=False)
                    return
                continue
            if dead:
                self._abort(self._describe_dead(dead, f"sent no heartbeat for over {self.timeout:g} s "
                                                      "(--distributed-timeout-minutes)"))
                return

    def _read_counters(self, ranks: List[int]) -> List[int]:
        keys = [_hb_key(r) for r in ranks]
        if self.store.check(keys):  # the usual case once every rank has started: two round trips in all
            return [int(v) for v in self.store.multi_get(keys)]
        present = [k for k in keys if self.store.check([k])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        return [int(values[k]) if k in values else 0 for k in keys]

    def _stale_ranks(self, threshold: float) -> List[int]:
        """Watched ranks whose counter has not moved for ``threshold`` seconds and that did not finish."""
        if not self._watched:
            return []
        now = time.monotonic()
        dead = []
        for r, value in zip(self._watched, self._read_counters(self._watched)):
            if value != self._last_value[r]:
                self._last_value[r], self._last_change[r] = value, now
            elif value < _DONE and now - self._last_change[r] > threshold and r != self.rank:
                dead.append(r)
        return dead

    def silent_ranks(self, window: float) -> List[int]:
        """Ranks (any, not only watched ones) whose heartbeat does not advance within ``window`` seconds."""
        others = [r for r in range(self.world_size) if r != self.rank]
        with self._lock:
            before = self._read_counters(others)
        time.sleep(window)
        with self._lock:
            after = self._read_counters(others)
        return [r for r, a, b in zip(others, before, after) if a == b and a < _DONE]

    def _describe_dead(self, ranks: List[int], what: str) -> str:
        names = ", ".join(str(r) for r in ranks)
        return f"rank{'s' if len(ranks) > 1 else ''} {names} {what}: it died or hung"

    def _abort(self, reason: str, publish: bool = True) -> None:
        if publish:
            try:
                with self._lock:
                    if not self.store.check([_ABORT_KEY]):
                        self.store.set(_ABORT_KEY, reason)
            except Exception:  # best effort: the others still time out on their own
                pass
        print(f"[rank {self.rank}] aborting the job: {reason}", file=sys.stderr, flush=True)
        self._stop.set()
        self.exit_func(1)

    # -- process exit ----------------------------------------------------------------------------
    def report_exception(self, exc: BaseException) -> None:
        """Publish an uncaught exception of this rank (or the peers that went silent) and abort."""
        reason = f"rank {self.rank} failed with {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        comm_error = isinstance(exc, getattr(dist, "DistBackendError", ())) or any(
            w in str(exc) for w in ("Connection closed", "Connection reset", "Gloo", "NCCL", "Socket", "timed out"))
        if comm_error:
            try:
                silent = self.silent_ranks(3 * self.interval + 0.5)
            except Exception:
                silent = []
            if silent:
                reason = self._describe_dead(silent, "stopped sending heartbeats") + f" ({reason})"
        self._abort(reason)

    def finish(self) -> None:
        """Mark this rank as cleanly finished (so nobody takes it for dead) and stop the thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self._lock:
                self.store.add(_hb_key(self.rank), _DONE)
        except Exception:
            pass


_LIVENESS_MONITOR: Optional[JobLivenessMonitor] = None


def _excepthook(exc_type, exc, tb) -> None:
    """Print the traceback, then tell the whole job which rank failed and exit (installed with the monitor)."""
    traceback.print_exception(exc_type, exc, tb)
    sys.stderr.flush()
    if _LIVENESS_MONITOR is not None and not isinstance(exc, KeyboardInterrupt):
        _LIVENESS_MONITOR.report_exception(exc)  # exits with status 1


def start_liveness_monitor(launch: LaunchEnv, timeout_minutes: float) -> Optional[JobLivenessMonitor]:
    """Start the job's liveness monitor for this rank (no-op for one rank); see :class:`JobLivenessMonitor`."""
    global _LIVENESS_MONITOR
    if launch.world_size <= 1 or _LIVENESS_MONITOR is not None:
        return _LIVENESS_MONITOR
    _LIVENESS_MONITOR = JobLivenessMonitor(launch.rank, launch.world_size, launch.master_addr, launch.master_port,
                                           timeout=timeout_minutes * 60.0).start()
    atexit.register(_LIVENESS_MONITOR.finish)
    sys.excepthook = _excepthook
    return _LIVENESS_MONITOR


def get_liveness_monitor() -> Optional[JobLivenessMonitor]:
    return _LIVENESS_MONITOR


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
        launch.master_addr, launch.master_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        start_liveness_monitor(launch, args.distributed_timeout_minutes)
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
    if args.use_checkpoint_args:
        if args.load is None:
            raise ArgumentError("--use-checkpoint-args needs --load DIR (the checkpoint to read the model flags from)")
        from megatron.training.checkpointing import load_args_from_checkpoint

        load_args_from_checkpoint(args)
    args = validate_args(args, _world_size_hint(), args_defaults)
    global_vars.set_args(args)
    _initialize_distributed(args)
    set_random_seed(args.seed)
    _build_tokenizer(args)
    global_vars.set_tensorboard_writer(args)
    global_vars.set_signal_handler()
    return args
