"""Launching pretrain_gpt.py for real: two torchrun "nodes" on 127.0.0.1, SLURM-style tasks without torchrun,
a rank killed mid-training, and SIGTERM pre-emption with bit-exact resume."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.multiprocess import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(ROOT, "pretrain_gpt.py")
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--vocab-size", "200", "--make-vocab-size-divisible-by", "8",
        "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-3",
        "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--seed", "7", "--micro-batch-size", "2", "--global-batch-size", "8"]
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def losses(text):
    """{iteration: lm loss} from Megatron log lines."""
    return {int(m.group(1)): float(m.group(2)) for m in LOSS_RE.finditer(text)}


def _torchrun(nnodes, node_rank, nproc, port, flags):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port), PRETRAIN,
            *flags]


@pytest.mark.slow
def test_two_torchrun_nodes_tp2_dp2_match_single_process(tmp_path):
    flags = TINY + ["--train-iters", "6"]
    port = find_free_port()
    nodes = [subprocess.Popen(_torchrun(2, n, 2, port, flags + ["--tensor-model-parallel-size", "2"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for n in (0, 1)]
    # Meanwhile the reference: one plain python process (world size 1, TP=1, no launcher).
    single = subprocess.run([sys.executable, PRETRAIN, *flags], capture_output=True, text=True, timeout=300,
                            env=_env(), cwd=tmp_path)
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    assert "initialized single job: world size 1" in single.stdout
    assert "initialized torchrun job: world size 4" in outs[0][0] + outs[1][0]
    assert "TP=2 PP=1 DP=2" in outs[0][0] + outs[1][0]
    multi = losses(outs[1][0])  # the last rank (node 1) prints the iteration lines
    ref = losses(single.stdout)
    assert sorted(multi) == sorted(ref) == list(range(1, 7))
    for it in ref:
        assert abs(multi[it] - ref[it]) <= 2e-5 * abs(ref[it]), (it, multi[it], ref[it])
    assert ref[6] < ref[1]


def _slurm_task_env(rank, world, job_id, nodelist="localhost"):
    return _env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_STEP_NUM_TASKS=str(world), SLURM_STEP_ID="0",
                SLURM_LOCALID=str(rank), SLURM_JOB_ID=str(job_id),
                SLURM_JOB_NODELIST=nodelist)


@pytest.mark.slow
def test_killed_rank_makes_the_job_exit_nonzero_naming_it(tmp_path):
    """Two SLURM-style tasks (no torchrun agent to clean up): SIGKILL rank 1 mid-training."""
    job_id = find_free_port() - 10000  # the port SLURM tasks derive from the job id is free
    flags = TINY + ["--train-iters", "100000", "--distributed-timeout-minutes", "0.1"]  # 6 s
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, PRETRAIN, *flags], stdout=logs[r], stderr=subprocess.STDOUT,
                              env=_slurm_task_env(r, 2, job_id), cwd=tmp_path) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(losses((tmp_path / "rank1.log").read_text())) < 3:
            assert procs[0].poll() is None and procs[1].poll() is None, (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        assert len(losses((tmp_path / "rank1.log").read_text())) >= 3, "training never started"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rc = procs[0].wait(timeout=6 + 30)  # within --distributed-timeout-minutes (+ slack), no hang
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out0 = (tmp_path / "rank0.log").read_text()
    assert "initialized slurm job: world size 2" in out0
    assert rc != 0, out0[-3000:]
    assert re.search(r"\[rank 0\] aborting the job: rank 1 ", out0), out0[-3000:]
    assert elapsed < 6 + 15, elapsed


def _checkpointing_available():
    try:
        import megatron.training.checkpointing  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _checkpointing_available(), reason="megatron.training.checkpointing has not landed yet")
def test_sigterm_saves_at_step_boundary_and_resume_is_bit_exact(tmp_path):
    """torchrun TP=2: SIGTERM to the workers mid-run -> checkpoint + clean exit; --load resumes bit-exactly."""
    total = 40
    flags = TINY + ["--tensor-model-parallel-size", "2", "--train-iters", str(total)]
    env = _env()
    ref = subprocess.run(_torchrun(1, 0, 2, find_free_port(), flags), capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = losses(ref.stdout)
    assert sorted(ref_losses) == list(range(1, total + 1))

    save = tmp_path / "ckpt"
    # SLURM's pre-emption path: the signal reaches the worker processes (srun signals every task).
    logs = [open(tmp_path / f"run{r}.log", "w+") for r in range(2)]
    job_id = find_free_port() - 10000
    procs = [subprocess.Popen([sys.executable, PRETRAIN, *flags, "--save", str(save)], stdout=logs[r],
                              stderr=subprocess.STDOUT, env=_slurm_task_env(r, 2, job_id), cwd=tmp_path)
             for r in range(2)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(losses((tmp_path / "run1.log").read_text())) < 3:
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    rcs = [p.wait(timeout=120) for p in procs]
    text, text0 = (tmp_path / "run1.log").read_text(), (tmp_path / "run0.log").read_text()
    assert rcs == [0, 0], text0[-3000:]
    assert re.search(r"exiting program at iteration \d+: received a termination signal", text0), text0[-3000:]
    stopped = max(losses(text))
    assert 3 <= stopped < total, "the signal arrived after training had finished"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    resumed = subprocess.run(_torchrun(1, 0, 2, find_free_port(), flags + ["--load", str(save), "--save",
                                                                            str(save)]),
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = losses(resumed.stdout)
    assert sorted(after) == list(range(stopped + 1, total + 1))
    first = losses(text)
    for it in range(1, stopped + 1):
        assert first[it] == ref_losses[it], it
    for it in after:  # bit-exact continuation: identical printed losses to the uninterrupted run
        assert after[it] == ref_losses[it], (it, after[it], ref_losses[it])
