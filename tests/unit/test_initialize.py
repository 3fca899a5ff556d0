"""Launch-environment resolution (torchrun / SLURM / plain) and the job liveness monitor, in-process."""

import os
import stat
import time

import torch.distributed as dist

from megatron.training.initialize import JobLivenessMonitor, resolve_launch_env
from tests.multiprocess import find_free_port


def test_torchrun_env_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "4321",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    got = resolve_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == \
        (3, 8, 1, "10.0.0.5", 4321, "torchrun")


def test_slurm_env_uses_scontrol_first_host_and_job_id_port(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    # A fake scontrol that expands the node list the way SLURM does (checked: called with our list).
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08],cpu1" ] || exit 3\n'
                        'printf "gpu07\\ngpu08\\ncpu1\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1"}
    got = resolve_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.launcher) == (5, 6, 2, "gpu07", "slurm")
    assert got.master_port == 10000 + 123456 % 50000
    # Every task of the job derives the same port; a different job gets another one.
    assert resolve_launch_env(dict(env, SLURM_PROCID="0")).master_port == got.master_port
    assert resolve_launch_env(dict(env, SLURM_JOB_ID="123457")).master_port != got.master_port
    assert resolve_launch_env(dict(env, MASTER_PORT="2222", MASTER_ADDR="h9")).master_port == 2222


def test_slurm_nodelist_fallback_without_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[03-05,09],x",
           "SLURM_STEP_ID": "0"}
    assert resolve_launch_env(env).master_addr == "node03"
    assert resolve_launch_env(dict(env, SLURM_JOB_NODELIST="single")).master_addr == "single"


def test_plain_python_is_world_of_one():
    got = resolve_launch_env({})
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.launcher) == (0, 1, 0, "127.0.0.1",
                                                                                         "single")
    assert 0 < got.master_port < 65536


class _Exit(Exception):
    pass


def _monitors(world, timeout, interval=0.1):
    port = find_free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    exits = {r: [] for r in range(world)}
    mons = [JobLivenessMonitor(r, world, "127.0.0.1", port, timeout=timeout, interval=interval,
                               exit_func=exits[r].append) for r in range(world)]
    return server, mons, exits


def _wait(cond, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end and not cond():
        time.sleep(0.05)
    return cond()


def test_monitor_names_a_silent_rank_and_everyone_aborts(capfd):
    server, mons, exits = _monitors(3, timeout=1.0)
    for m in mons:
        m.start()
    time.sleep(0.5)
    assert not any(exits.values())  # healthy job: nobody aborts
    mons[2]._stop.set()  # rank 2 "dies": no more heartbeats, no clean-exit mark
    start = time.monotonic()
    assert _wait(lambda: exits[0] and exits[1], 5.0), exits
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 3.0, elapsed  # declared dead after the timeout, not before, and promptly
    assert exits[0] == [1] and exits[1] == [1] and exits[2] == []
    err = capfd.readouterr().err
    assert "[rank 0] aborting the job: rank 2 sent no heartbeat" in err
    assert "[rank 1] aborting the job: rank 2 sent no heartbeat" in err
    del server


def test_monitor_ignores_cleanly_finished_ranks_and_watches_rank_0():
    server, mons, exits = _monitors(2, timeout=0.8)
    for m in mons:
        m.start()
    mons[1].finish()  # rank 1 exits cleanly first: not a failure
    time.sleep(1.5)
    assert exits == {0: [], 1: []}
    server2, mons2, exits2 = _monitors(2, timeout=0.8)
    for m in mons2:
        m.start()
    mons2[0]._stop.set()  # rank 0 dies: rank 1 watches it
    assert _wait(lambda: exits2[1], 4.0) and exits2[1] == [1] and exits2[0] == []
    for m in mons + mons2:
        m._stop.set()
    del server, server2


def test_exception_on_a_rank_is_published_with_its_name(capfd):
    server, mons, exits = _monitors(2, timeout=30.0)
    for m in mons:
        m.start()
    mons[1].report_exception(ValueError("bad batch"))
    assert exits[1] == [1]
    assert _wait(lambda: exits[0], 3.0) and exits[0] == [1]  # long before the 30 s timeout
    assert "[rank 0] aborting the job: rank 1 failed with ValueError: bad batch" in capfd.readouterr().err
    # A failed collective blames the peer that went silent, not the rank that saw the error.
    server, mons, exits = _monitors(2, timeout=30.0)
    for m in mons:
        m.start()
    mons[1]._stop.set()
    mons[0].report_exception(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"))
    assert exits[0] == [1]
    assert "rank 1 stopped sending heartbeats: it died or hung (rank 0 failed with RuntimeError" in \
        capfd.readouterr().err
    del server


def test_no_monitor_for_a_single_process():
    from megatron.training.initialize import LaunchEnv, start_liveness_monitor

    assert start_liveness_monitor(LaunchEnv(0, 1, 0, "127.0.0.1", 1, "single"), 1.0) is None


def test_plain_process_in_an_sbatch_script_is_a_single_rank():
    # The batch step sees SLURM_NTASKS=2 but no SLURM_STEP_ID: a plain `python pretrain_gpt.py` there is one rank.
    got = resolve_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9",
                              "SLURM_JOB_NODELIST": "n1"})
    assert (got.world_size, got.launcher) == (1, "single")
    step = resolve_launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2",
                               "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"})
    assert (step.rank, step.world_size, step.launcher) == (1, 2, "slurm")
