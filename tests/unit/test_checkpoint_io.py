"""Checkpoint files: crash safety under SIGKILL, refusal of pickled code, tracker/layout parsing."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from megatron.training.checkpoint_io import (
    CheckpointError,
    find_layout,
    get_checkpoint_name,
    read_tracker,
    safe_load,
    save_sharded_checkpoint,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    path = get_checkpoint_name(str(tmp_path), 1, 0, 0, 1)
    os.makedirs(os.path.dirname(path))
    torch.save({"model": {"w": torch.ones(2)}, "args": _Payload(marker)}, path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(CheckpointError, match="refusing to load .*allowlist"):
        safe_load(path)
    assert not os.path.exists(marker)
    # the same through the resharder / exporter entry point
    from megatron.training.checkpoint_conversion import load_global_checkpoint

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_global_checkpoint(str(tmp_path))
    assert not os.path.exists(marker)


def test_allowlisted_types_load(tmp_path):
    import argparse

    import numpy as np

    path = str(tmp_path / "x.pt")
    state = {"args": argparse.Namespace(params_dtype=torch.bfloat16, hidden_size=8), "np": np.random.get_state(),
             "py": random.getstate(), "t": torch.arange(3)}
    torch.save(state, path)
    back = safe_load(path)
    assert back["args"].params_dtype is torch.bfloat16 and back["py"] == state["py"]
    assert (back["np"][1] == state["np"][1]).all() and torch.equal(back["t"], state["t"])


def test_tracker_and_layout(tmp_path):
    assert read_tracker(str(tmp_path)) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert read_tracker(str(tmp_path)) == (0, True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration"):
        read_tracker(str(tmp_path))
    shards = {(t, p): {"x": torch.zeros(1)} for t in range(2) for p in range(3)}
    save_sharded_checkpoint(str(tmp_path), 40, shards, 3)
    assert read_tracker(str(tmp_path)) == (40, False)
    assert find_layout(str(tmp_path), 40) == (2, 3)
    assert os.path.isfile(tmp_path / "iter_0000040" / "mp_rank_01_002" / "model_optim_rng.pt")
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from megatron.training.checkpoint_io import save_sharded_checkpoint
    d = {d!r}
    def save(it, value):
        shards = {{(t, 0): {{"iteration": it, "value": value, "w": torch.full((1_500_000,), float(value))}}
                  for t in range(4)}}
        save_sharded_checkpoint(d, it, shards, 1)
    save(1, 1.0)
    print("ready", flush=True)
    it = 2
    while True:
        save(it, float(it))
        save(it, it + 0.5)  # re-save of the same iteration replaces the directory
        it += 1
""")


def test_sigkill_during_save_never_corrupts_the_checkpoint(tmp_path):
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for trial in range(4):
        d = str(tmp_path / f"t{trial}")
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=ROOT, d=d)], stdout=subprocess.PIPE,
                                env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        it, release = read_tracker(d)
        assert not release and it >= 1
        tp, pp = find_layout(d, it)
        assert (tp, pp) == (4, 1)
        values = set()
        for t in range(4):
            state = safe_load(get_checkpoint_name(d, it, t, 0, 1))
            assert state["iteration"] == it and state["w"].numel() == 1_500_000
            assert torch.all(state["w"] == state["value"])
            values.add(state["value"])
        assert len(values) == 1 and int(values.pop()) == it  # all shards from the same complete save
