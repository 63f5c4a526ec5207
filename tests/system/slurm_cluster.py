"""A throwaway one-node Slurm cluster on localhost, for tests that submit real sbatch jobs.

    with slurm_cluster() as cluster:
        job = cluster.sbatch("slurm/train.sbatch", args=["--out", "runs/x"], options=["--nodes=1"])
        info = cluster.wait_job(job, timeout=480)
        assert info.state == "COMPLETED" and info.exit_code == 0, cluster.diagnostics(job)

Everything lives in one temp dir: slurm.conf, state and spool dirs, logs, pid files, and a private munge
daemon with its own key and socket (``munged --socket``; slurm.conf reaches it via ``AuthInfo=socket=``).
The ports are picked free, the system plugstack is replaced by an empty one, and client commands are pointed
at the private conf through ``SLURM_CONF``, so a system Slurm or munge on the same machine is neither used
nor disturbed. The daemons run in the foreground under this process, so their pids are known from the start;
teardown (also after a failed start or a failing test) cancels the jobs, then stops every daemon by its pid
(and pid file): SIGTERM, a grace period, SIGKILL, and finally kills any job process left behind, found by
the private ``SLURM_CONF`` in its environment. It needs root: slurmd must be able to run jobs as any user.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import free_port

REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
# Job states after which a job never runs again (without an explicit requeue).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "TIMEOUT",
})


class SlurmClusterError(RuntimeError):
    """The cluster could not be started, or a command or job did not do what was asked in time."""


def which(program: str) -> str | None:
    """The program's path; daemons live in sbin dirs, which a non-root PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(program, path=path)


def missing_requirements() -> str | None:
    """Why a local cluster cannot be started here, or None when it can (a pytest skip reason)."""
    missing = [p for p in REQUIRED_PROGRAMS if which(p) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}; `make setup-slurm` installs them)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as the submitting user)"
    return None


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5,
               on_timeout: Callable[[], str] | None = None) -> None:
    """Poll ``check`` until it returns True; raise SlurmClusterError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise SlurmClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}".rstrip())
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path.name}: not written)"
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


@dataclass
class JobInfo:
    """What ``scontrol show job`` says about a job; exit_code is the batch script's, signal the killing one."""

    job_id: int
    state: str
    exit_code: int
    signal: int
    fields: dict[str, str] = field(repr=False)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]  # environment for client commands (sbatch, scontrol, ...): SLURM_CONF set
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    job_ids: list[int] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(self, *args: str, check: bool = True, timeout: float = 30,
            env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(list(args), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: str | Path, args: Sequence[str] = (), options: Sequence[str] = (),
               env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """Submit ``script`` with sbatch ``options`` and script ``args``; returns the job id.

        ``env`` is added to the submitting environment, which the job inherits (sbatch's default --export=ALL);
        ``cwd`` becomes the job's SLURM_SUBMIT_DIR and working directory.
        """
        proc = self.run("sbatch", "--parsable", *options, str(script), *args, env=env, cwd=cwd)
        job_id = int(proc.stdout.strip().split(";")[0])
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id: int) -> JobInfo | None:
        """The job's current record, or None once slurmctld has forgotten it (MinJobAge after it ended)."""
        proc = self.run("scontrol", "show", "job", "--oneliner", str(job_id), check=False)
        if proc.returncode != 0:
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), int(code or 0), int(sig or 0), fields)

    def wait_job(self, job_id: int, timeout: float, interval: float = 2.0) -> JobInfo:
        """Wait until the job reaches a terminal state; on timeout cancel it and raise with the logs."""
        last: list[JobInfo | None] = [None]

        def finished() -> bool:
            last[0] = self.job(job_id)
            if last[0] is None:
                raise SlurmClusterError(f"job {job_id} unknown to slurmctld\n{self.diagnostics(job_id)}")
            return last[0].done

        try:
            wait_until(finished, timeout, f"job {job_id} to finish", interval,
                       on_timeout=lambda: f"last state: {last[0]}\n{self.diagnostics(job_id)}")
        except SlurmClusterError:
            self.run("scancel", str(job_id), check=False)
            raise
        assert last[0] is not None
        return last[0]

    def node_state(self) -> str:
        proc = self.run("sinfo", "--noheader", "--nodes", self.node, "--format=%T", check=False)
        return proc.stdout.strip().lower() if proc.returncode == 0 else ""

    def diagnostics(self, job_id: int | None = None) -> str:
        """The daemon logs' tails, the node state and (given a job) its record: for assertion messages."""
        parts = [f"node {self.node}: {self.node_state() or '?'}"]
        if job_id is not None:
            info = self.job(job_id)
            parts.append(f"job {job_id}: {info.fields if info else 'forgotten'}")
        # munged runs in the foreground, so its log is its captured output.
        parts += [tail(self.log_dir / name) for name in ("slurmctld.log", "slurmd.log", "munged.stdout")]
        return "\n".join(parts)


def _write_conf(root: Path, node: str, cpus: int, munge_socket: Path, cred_expire: int) -> Path:
    state, spool, log, run = (root / d for d in ("state", "spool", "log", "run"))
    plugstack = root / "plugstack.conf"
    plugstack.write_text("# empty: keep the system's SPANK plugins out of this cluster\n")
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# Written by tests/system/slurm_cluster.py: a one-node cluster private to {root}.
ClusterName=gptosstest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={plugstack}
# No cgroups: works in containers and leaves the host's cgroup tree alone.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={log}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
# A small cluster can afford to look at its queue often: a requeued job starts seconds after it may.
SchedulerParameters=sched_interval=2,bf_interval=5
# Keep finished jobs visible to `scontrol show job` long enough to read their exit code.
MinJobAge=3600
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
# Slurm's default: how long ranks caught by a TERM (preemption, requeue) have to save before the KILL; a loaded
# 2-core runner needs more than 10 s for two ranks to write a checkpoint.
KillWait=30
# config_overrides: the CPUs below count even if the machine has fewer (a 2-rank job on a 1-core runner).
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    return conf


def _start(cluster: SlurmCluster, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> None:
    argv = [which(cmd[0]) or cmd[0], *cmd[1:]]
    # Its own session: a Ctrl-C meant for pytest does not reach the daemons before teardown stops them.
    with open(cluster.log_dir / f"{name}.stdout", "wb") as out:  # the daemon keeps its own copy of the fd
        cluster.procs[name] = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True)


def _pids(cluster: SlurmCluster) -> list[int]:
    """Every live daemon pid we know: the Popen handles, and the pid files (in case a daemon forked) where the
    process named there still runs with this cluster's paths on its command line (not a recycled pid)."""
    pids = {p.pid for p in cluster.procs.values() if p.poll() is None}
    for pidfile in (cluster.root / "run").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            if str(cluster.root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
    return sorted(pids)


def _job_leftovers(cluster: SlurmCluster) -> list[int]:
    """Processes (slurmstepd and job tasks) whose environment points at this cluster's conf."""
    marker = f"SLURM_CONF={cluster.conf}".encode()
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                found.append(int(proc_dir.name))
    return found


def _kill_all(pids: Sequence[int], grace: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stop(cluster: SlurmCluster) -> None:
    """Teardown; every phase runs even if an earlier one failed, so no daemon outlives the cluster."""
    try:  # Cancel what is still queued or running, so slurmd cleans up its steps while it is alive.
        slurmctld = cluster.procs.get("slurmctld")
        live = [j for j in cluster.job_ids if (info := _safe_job(cluster, j)) is not None and not info.done]
        if live and slurmctld is not None and slurmctld.poll() is None:
            cluster.run("scancel", *map(str, live), check=False)
            wait_until(lambda: not any((i := _safe_job(cluster, j)) is not None and not i.done for j in live),
                       30, "cancelled jobs to end")
    except Exception:  # best effort: the kills below are what matters
        pass
    # Slurm first (it talks to munge while shutting down), munge last; then anything the pid files name.
    for names in (("slurmd", "slurmctld"), ("munged",)):
        _kill_all([p.pid for n, p in cluster.procs.items() if n in names and p.poll() is None], grace=15)
    _kill_all(_pids(cluster), grace=5)
    # Job processes (slurmstepd, the tasks) that slurmd did not take down with it.
    _kill_all(_job_leftovers(cluster), grace=5)
    for proc in cluster.procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _safe_job(cluster: SlurmCluster, job_id: int) -> JobInfo | None:
    try:
        return cluster.job(job_id)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def slurm_cluster(base_dir: str | Path | None = None, cpus: int | None = None, start_timeout: float = 60,
                  cred_expire: int = 30, keep_dir: bool = False) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd in a fresh temp dir; yield once ``sinfo`` shows the node idle.

    ``base_dir`` holds the temp dir (default: the system temp dir; keep it short, since the munge socket path
    must fit a unix socket's 107 bytes). ``cred_expire`` (seconds) bounds job-step credentials and is also the
    delay before a requeued job starts again. The dir is removed afterwards unless ``keep_dir`` is set.
    """
    reason = missing_requirements()
    if reason:
        raise SlurmClusterError(reason)
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir=base_dir))
    node = socket.gethostname().split(".")[0]  # slurmd identifies itself by its short hostname
    cpus = cpus or os.cpu_count() or 1
    root.chmod(0o755)  # jobs of other users must reach the munge socket and the conf
    for d in ("state", "spool", "log", "run", "munge"):
        (root / d).mkdir(mode=0o755)
    munge_socket = root / "munge" / "munge.socket"
    if len(str(munge_socket)) > 100:
        raise SlurmClusterError(f"{munge_socket} is too long for a unix socket; pass a shorter base_dir")
    conf = _write_conf(root, node, cpus, munge_socket, cred_expire)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, env=env)
    try:
        key = root / "munge" / "munge.key"
        # Created owner-read-only (munged refuses a key others can read), never readable in between.
        with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(secrets.token_bytes(1024))
        # --force: munged refuses root and a world-writable ancestor (/tmp) without it.
        _start(cluster, "munged", [
            "munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed", "--num-threads=2",
        ], env)
        wait_until(lambda: munge_socket.exists() or cluster.procs["munged"].poll() is not None, start_timeout,
                   "munged to create its socket", on_timeout=cluster.diagnostics)
        _check_alive(cluster, "munged")
        # -D: foreground, so the pid is ours from the start; -i: ignore stale state (there is none).
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)], env)
        wait_until(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0
                   or cluster.procs["slurmctld"].poll() is not None, start_timeout, "slurmctld to answer",
                   on_timeout=cluster.diagnostics)
        _check_alive(cluster, "slurmctld")
        _start(cluster, "slurmd", ["slurmd", "-D", "-f", str(conf), "-N", node], env)

        def idle() -> bool:
            for name in cluster.procs:
                _check_alive(cluster, name)
            return cluster.node_state() == "idle"

        wait_until(idle, start_timeout, f"node {node} to be idle in sinfo", on_timeout=cluster.diagnostics)
        yield cluster
    finally:
        _stop(cluster)
        if not keep_dir:
            shutil.rmtree(root, ignore_errors=True)


def _check_alive(cluster: SlurmCluster, name: str) -> None:
    code = cluster.procs[name].poll()
    if code is not None:
        raise SlurmClusterError(f"{name} exited {code} during startup\n"
                                f"{tail(cluster.log_dir / f'{name}.stdout')}\n{cluster.diagnostics()}")


def slurm_cluster_fixture(scope: str = "module", **kwargs: Any) -> Callable[..., Iterator[SlurmCluster]]:
    """A pytest fixture (``my_cluster = slurm_cluster_fixture()`` in a test module) that yields a cluster,
    skipping the test with the reason when Slurm, munge or root are missing."""
    import pytest

    @pytest.fixture(scope=scope)
    def _fixture() -> Iterator[SlurmCluster]:
        reason = missing_requirements()
        if reason:
            pytest.skip(reason)
        with slurm_cluster(**kwargs) as cluster:
            yield cluster

    return _fixture
