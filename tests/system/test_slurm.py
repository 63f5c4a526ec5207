"""The repo's sbatch scripts on a real (one-node, localhost) Slurm cluster, training the tiny model on CPU.

tests/system/slurm_cluster.py starts munged, slurmctld and slurmd privately in a temp dir; the jobs are submitted
from the repo root exactly as a user would, with options passed through sbatch's command line and the
environment. Three jobs, one per launch path:

- slurm/train.sbatch, LAUNCHER=srun: srun starts two tasks, one per rank (RANK = SLURM_PROCID, ...).
- slurm/train_single.sbatch: one task; torch.distributed.run --standalone starts the two ranks.
- slurm/train.sbatch, default torchrun launcher: the time-limit warning (USR1 to the batch shell, as
  `--signal=B:USR1@120` sends it) makes the ranks save a checkpoint and exit, the job requeues itself and
  the second attempt resumes from that checkpoint to the end.

Skipped (with the reason) where Slurm, munge or root are missing; `make test` installs Slurm when root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import JobInfo, SlurmCluster, slurm_cluster_fixture

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Generous: a loaded 2-core runner starts two DeepSpeed ranks and a requeued job in well under this.
JOB_TIMEOUT = 480
TRAIN_ARGS = ["--model", "tiny", "--seq_len", "32", "--eval_every", "0"]

# Two ranks need two CPUs in Slurm's eyes; the cluster may claim more than a 1-core runner has.
slurm = slurm_cluster_fixture(scope="module", cpus=max(2, os.cpu_count() or 1), cred_expire=10)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    proc = subprocess.run([sys.executable, "launch/prepare_data.py", "--synthetic", "200", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What the job needs beyond the submitting environment: CPU DeepSpeed, its config, this interpreter."""
    env = {"DS_ACCELERATOR": "cpu", "DS_CONFIG": "ds_configs/cpu.json", "PYTHON": sys.executable, **extra}
    try:  # The scripts rendezvous at the first node's name; a container's hostname may not resolve.
        socket.gethostbyname(cluster.node)
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"
    return env


def submit(cluster: SlurmCluster, script: str, log: Path, options: list[str], args: list[str],
           **env: str) -> int:
    return cluster.sbatch(REPO / script, args=args, options=[f"--output={log}", "--time=15", *options],
                          env=job_env(cluster, **env), cwd=REPO)


def wait_ok(cluster: SlurmCluster, job: int, log: Path) -> JobInfo:
    info = cluster.wait_job(job, timeout=JOB_TIMEOUT)
    assert (info.state, info.exit_code, info.signal) == ("COMPLETED", 0, 0), explain(cluster, job, log)
    return info


def explain(cluster: SlurmCluster, job: int, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no job output)"
    return f"--- job output {log} (last 6000 chars) ---\n{text[-6000:]}\n{cluster.diagnostics(job)}"


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for_training(cluster: SlurmCluster, job: int, out: Path, log: Path) -> float:
    """Until the job's first step is logged (signal early: on a fast CPU 12 steps take a few seconds); returns
    the deadline of the job's whole life."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not metrics(out):
        info = cluster.job(job)
        assert info is not None and not info.done, explain(cluster, job, log)
        assert time.monotonic() < deadline, explain(cluster, job, log)
        time.sleep(0.25)
    return deadline


def assert_checkpoint(out: Path, step: int) -> dict:
    """`latest` names a complete checkpoint directory at `step`; returns its train_state.json."""
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").is_file(), sorted(p.name for p in out.rglob("*"))
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag).is_dir() and any((ckpt / tag).glob("*model_states.pt")), sorted(ckpt.rglob("*"))
    state = json.loads((ckpt / tag / "train_state.json").read_text())
    assert state["world_size"] == 2
    assert metrics(out)[-1]["step"] == step
    return state


def test_train_sbatch_srun_two_tasks(slurm: SlurmCluster, data_dir: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, "slurm/train.sbatch", log, ["--nodes=1", "--ntasks-per-node=2"],
                 [*TRAIN_ARGS, "--data", str(data_dir), "--out", str(out), "--max_steps", "3", "--save_every", "3"],
                 LAUNCHER="srun")
    wait_ok(slurm, job, log)
    assert_checkpoint(out, step=3)
    assert "srun, 1 node(s) x 2 rank(s) = world 2" in log.read_text()


def test_train_single_sbatch_torchrun(slurm: SlurmCluster, data_dir: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, "slurm/train_single.sbatch", log, [f"--cpus-per-task={slurm.cpus}"],
                 [*TRAIN_ARGS, "--data", str(data_dir), "--out", str(out), "--max_steps", "3", "--save_every", "3"],
                 GPUS_PER_NODE="2")
    wait_ok(slurm, job, log)
    assert_checkpoint(out, step=3)


def test_time_limit_warning_saves_requeues_and_resumes(slurm: SlurmCluster, data_dir: Path, tmp_path: Path) -> None:
    out, log, steps = tmp_path / "run", tmp_path / "job.out", 12
    job = submit(slurm, "slurm/train.sbatch", log, ["--nodes=1"],
                 [*TRAIN_ARGS, "--data", str(data_dir), "--out", str(out), "--max_steps", str(steps),
                  "--save_every", "0", "--log_every", "1"],
                 GPUS_PER_NODE="2")
    # Once training is under way, send what `--signal=B:USR1@120` sends 120 s before the time limit.
    wait_for_training(slurm, job, out, log)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))

    info = wait_ok(slurm, job, log)
    text = log.read_text()
    assert info.fields["Restarts"] == "1", explain(slurm, job, log)
    assert "caught SIGUSR1" in text and "requeueing job" in text
    assert "stopped by signal" in text and "resumed from" in text, explain(slurm, job, log)
    state = assert_checkpoint(out, step=steps)
    assert state["reason"] == "final"
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))  # no step lost or repeated


def test_requeue_with_fewer_tasks_resumes_resharded(slurm: SlurmCluster, data_dir: Path, tmp_path: Path) -> None:
    """A job of two tasks is preempted (requeued: TERM, the ranks save), comes back with one task, and the run
    goes on at world 1 from the world-2 checkpoint (gptoss.train.reshard), no step lost or repeated."""
    out, log, steps = tmp_path / "run", tmp_path / "job.out", 12
    job = submit(slurm, "slurm/train.sbatch", log, ["--nodes=1", "--ntasks-per-node=2"],
                 [*TRAIN_ARGS, "--data", str(data_dir), "--out", str(out), "--max_steps", str(steps),
                  "--save_every", "0", "--log_every", "1"],
                 LAUNCHER="srun")
    deadline = wait_for_training(slurm, job, out, log)
    slurm.run("scontrol", "requeuehold", str(job))  # what preemption with requeue does, held for the resize

    def held() -> bool:
        info = slurm.job(job)
        return info is not None and info.state == "PENDING" and "held" in info.fields.get("Reason", "").lower()

    # Held comes as soon as the batch script ends; the ranks may still be writing their checkpoint.
    while not (held() and (out / "checkpoints" / "latest").is_file()):
        assert time.monotonic() < deadline, f"{slurm.job(job)}\n{explain(slurm, job, log)}"
        time.sleep(0.5)
    first = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
                        / "train_state.json").read_text())
    assert (first["world_size"], first["reason"]) == (2, "signal"), first
    slurm.run("scontrol", "update", f"JobId={job}", "NumTasks=1", "TasksPerNode=1")
    slurm.run("scontrol", "release", str(job))

    wait_ok(slurm, job, log)
    text = log.read_text()
    assert "(restart 1) on vm: srun, 1 node(s) x 1 rank(s) = world 1" in text.replace(slurm.node, "vm"), text
    assert f"resharding step{first['step']:08d}: world 2 ep 1 -> world 1 ep 1" in text, explain(slurm, job, log)
    last = json.loads((out / "checkpoints" / f"step{steps:08d}" / "train_state.json").read_text())
    assert (last["world_size"], last["reason"], last["parent"]) == (1, "final", f"step{first['step']:08d}")
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
