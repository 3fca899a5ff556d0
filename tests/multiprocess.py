"""Run a test body on N ranks: spawned processes, gloo on CPU (NCCL when CUDA is present).

Usage::

    def _body(rank, world_size, tp):          # module-level, so spawn can import it
        parallel_state.initialize_model_parallel(tp)
        ...
        return some_picklable_result           # optional

    def test_x():
        results = run_distributed(_body, world_size=4, args=(2,))   # list indexed by rank

* A free TCP port is picked for each run.
* A run that does not finish within ``timeout`` seconds is killed and the test fails (a deadlocked
  collective cannot hang CI); the collectives themselves also time out.
* An exception in any rank fails the test with that rank's full traceback.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.getsockname()[1]


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _to_portable(obj):
    """Tensors -> ('__tensor__', numpy array): torch's shared-memory pickling dies with the worker."""
    if isinstance(obj, torch.Tensor):
        return ("__tensor__", obj.detach().cpu().float().numpy() if obj.dtype == torch.bfloat16
                else obj.detach().cpu().numpy())
    if isinstance(obj, dict):
        return {k: _to_portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_portable(v) for v in obj)
    return obj


def _from_portable(obj):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
        return torch.from_numpy(obj[1])
    if isinstance(obj, dict):
        return {k: _from_portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_portable(v) for v in obj)
    return obj


def _worker(rank, world_size, port, backend, timeout, fn, args, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            out = fn(rank, world_size, *args)
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, "ok", _to_portable(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 120.0,
                    backend: Optional[str] = None) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks and return their results.

    Results may contain tensors (sent back as numpy arrays and rebuilt as CPU tensors).

    Raises:
        AssertionError: naming the failing rank with its traceback, or the ranks still running
            after ``timeout`` seconds.
    """
    backend = backend or _default_backend()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout, fn, tuple(args), results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes, errors = {}, []
    deadline = timeout + 30.0  # allow the collectives' own timeout to fire first
    try:
        end = time.monotonic() + deadline
        while len(outcomes) < world_size:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    time.sleep(0.5)  # give the dead rank's queue message a moment to arrive
                    if results.empty():
                        errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                        break
                continue
            outcomes[rank] = (status, payload)
            if status == "error":
                errors.append(f"rank {rank} raised:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError(f"distributed test {fn.__name__} (world size {world_size}) failed: {errors[0]}")
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        raise AssertionError(f"distributed test {fn.__name__} (world size {world_size}) timed out after "
                             f"{deadline:.0f}s; ranks {missing} never finished (deadlock?)")
    return [_from_portable(outcomes[r][1]) for r in range(world_size)]
