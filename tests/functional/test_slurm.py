"""A real SLURM cluster on this machine: munged + slurmctld + two emulated slurmd nodes, started from a
config in a temp dir; examples/pretrain_gpt_slurm.sbatch is submitted with sbatch (torchrun per node, and
one task per rank without torchrun), and must COMPLETE with a falling loss. Every daemon is stopped by pid.

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (installed with apt-get when missing).
"""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.functional.test_launch import losses
from tests.multiprocess import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged"]


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def _ensure_slurm_installed():
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root (apt-get install " + " ".join(PACKAGES) + ")")
    if not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install " + " ".join(PACKAGES))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"apt-get install failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
    missing = [b for b in BINARIES if not _which(b)]
    assert not missing, f"installed {PACKAGES} but {missing} are still not on PATH"


SLURM_CONF = """\
ClusterName=megatron-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.socket.2,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
FirstJobId={first_job_id}
MinJobAge=600
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs={cpus} RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _stop_pid(pid_file):
    try:
        pid = int(open(pid_file).read().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster test runs munged/slurmctld/slurmd as root; not root here")
    _ensure_slurm_installed()
    d = str(tmp_path_factory.mktemp("slurm"))
    os.makedirs(f"{d}/state")
    key = f"{d}/munge.key"
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = f"{d}/slurm.conf"
    with open(conf, "w") as f:
        f.write(SLURM_CONF.format(d=d, ctld_port=find_free_port(), slurmd_port=find_free_port(),
                                  n1_port=find_free_port(), n2_port=find_free_port(), cpus=os.cpu_count() or 2,
                                  first_job_id=1000 + int.from_bytes(os.urandom(2), "little") % 30000))
    env = dict(os.environ, SLURM_CONF=conf)
    pid_files = [f"{d}/munged.pid", f"{d}/slurmctld.pid", f"{d}/slurmd-n1.pid", f"{d}/slurmd-n2.pid"]
    starts = [[_which("munged"), "--force", f"--key-file={key}", f"--socket={d}/munge.socket.2",
               f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
              [_which("slurmctld"), "-f", conf],
              [_which("slurmd"), "-f", conf, "-N", "n1"],
              [_which("slurmd"), "-f", conf, "-N", "n2"]]
    try:
        for cmd, pid_file in zip(starts, pid_files):
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
            assert out.returncode == 0, f"{cmd[0]} failed to start: {out.stderr[-2000:]}"
            end = time.monotonic() + 15
            while not os.path.exists(pid_file) and time.monotonic() < end:
                time.sleep(0.1)
            assert os.path.exists(pid_file), f"{cmd[0]} wrote no pid file {pid_file}"
        end = time.monotonic() + 60
        state = ""
        while time.monotonic() < end:
            state = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                                   env=env, timeout=30).stdout
            if sorted(state.split()) == ["idle", "idle", "n1", "n2"]:
                break
            time.sleep(0.3)
        assert sorted(state.split()) == ["idle", "idle", "n1", "n2"], f"nodes not idle: {state!r}"
        yield env, d
    finally:
        subprocess.run([_which("scancel") or "scancel", "--user", "root"], capture_output=True, env=env, timeout=30) \
            if _which("scancel") else None
        for pid_file in reversed(pid_files):
            _stop_pid(pid_file)


def _sbatch(env, log, ntasks_per_node=1, **settings):
    """Submits examples/pretrain_gpt_slurm.sbatch on 2 nodes with a tiny TP=2 mock-data model; returns the job id."""
    venv_py = os.path.join(ROOT, ".venv/bin/python")
    job_env = dict(env, MODEL_SIZE="tiny", MOCK_DATA="1", VOCAB_SIZE="200", TP="2", LR="3e-3", WARMUP_ITERS="0",
                   MICRO_BATCH="2", GLOBAL_BATCH="8", EVAL_ITERS="0", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                   PY=venv_py if os.path.exists(venv_py) else shutil.which("python3"), PYTHONPATH=ROOT,
                   DIST_TIMEOUT_MIN="1", EXTRA_ARGS="--hidden-dropout 0 --attention-dropout 0", **settings)
    out = subprocess.run([_which("sbatch"), "--parsable", "--nodes=2", f"--ntasks-per-node={ntasks_per_node}",
                          "--overcommit", f"--output={log}", "--time=10",
                          os.path.join(ROOT, "examples/pretrain_gpt_slurm.sbatch")],
                         capture_output=True, text=True, env=job_env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _wait_for_job(env, job_id, seconds, ended):
    """Polls `scontrol show job` until JobState is one of `ended` or time runs out; returns (state, restarts)."""
    end = time.monotonic() + seconds
    state, restarts = "", 0
    while time.monotonic() < end:
        info = subprocess.run([_which("scontrol"), "show", "job", job_id], capture_output=True, text=True, env=env,
                              timeout=30).stdout
        state = (re.search(r"JobState=(\S+)", info) or [None, ""])[1]
        restarts = int((re.search(r"Restarts=(\d+)", info) or [None, "0"])[1])
        if state in ended:
            break
        time.sleep(0.5)
    return state, restarts


def _run_job(env, d, launch, ntasks_per_node):
    log = f"{d}/job-{launch}.out"
    job_id = _sbatch(env, log, ntasks_per_node, TRAIN_ITERS="30", LOG_INTERVAL="5", LAUNCH=launch)
    state, _ = _wait_for_job(env, job_id, 150,
                             ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"))
    text = open(log).read() if os.path.exists(log) else "(no job log)"
    assert state == "COMPLETED", f"job {job_id} ended {state!r}; log:\n{text[-4000:]}"
    return text


@pytest.mark.slow
@pytest.mark.parametrize("launch,ntasks_per_node,launcher", [("torchrun", 1, "torchrun"), ("srun", 1, "slurm")])
def test_sbatch_job_completes_with_falling_loss(slurm_cluster, launch, ntasks_per_node, launcher):
    env, d = slurm_cluster
    text = _run_job(env, d, launch, ntasks_per_node)
    assert f"initialized {launcher} job: world size 2" in text, text[-3000:]
    assert "TP=2 PP=1 DP=1" in text
    assert "on n[1-2]: 2 nodes" in text
    curve = losses(text)
    assert sorted(curve) == [5, 10, 15, 20, 25, 30], text[-3000:]
    assert curve[30] < curve[5] - 0.5, curve


@pytest.mark.slow
def test_usr1_preemption_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    """SLURM's warning signal (as --signal=USR1@... sends it, to every step process): the torchrun-launched
    ranks save at the next step and exit 0, the batch script requeues the job, and the requeued run resumes
    from the checkpoint to the end."""
    env, d = slurm_cluster
    ckpt = tmp_path / "ckpt"
    log = f"{d}/job-preempt.out"
    job_id = _sbatch(env, log, TRAIN_ITERS="80", LOG_INTERVAL="1", LAUNCH="torchrun", CHECKPOINT_PATH=str(ckpt))
    end = time.monotonic() + 120
    while time.monotonic() < end and len(losses(open(log).read() if os.path.exists(log) else "")) < 5:
        time.sleep(0.2)
    sent = subprocess.run([_which("scancel"), "--signal=USR1", job_id], capture_output=True, text=True, env=env,
                          timeout=30)
    assert sent.returncode == 0, sent.stderr
    state, restarts = _wait_for_job(env, job_id, 240, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
    text = open(log).read()
    assert state == "COMPLETED" and restarts == 1, f"{state} restarts={restarts}\n{text[-4000:]}"
    stopped = re.search(r"exiting program at iteration (\d+): received a termination signal", text)
    assert stopped, text[-4000:]
    assert f"pre-empted): requeueing job {job_id}" in text
    assert "(restart 1)" in text
    # The second run loaded the checkpoint and trained only the remaining iterations.
    second = text.split("(restart 1)")[1]
    assert "iteration       80/      80" in second
    assert re.search(rf"iteration\s+{int(stopped.group(1)) + 1}/\s+80 \|", second), second[-3000:]
    assert not re.search(r"iteration\s+1/\s+80 \|", second)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "80"
