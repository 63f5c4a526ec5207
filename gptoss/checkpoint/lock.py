"""One writer per run directory: an advisory lock (`flock`) on `<out>/train.lock`, taken by rank 0 when the trainer
sets up (before any process group) and held until it ends, so a second training process on the same --out (a
resubmitted Slurm job next to a running one) stops at once instead of interleaving its checkpoints and metrics
with the first's. Kept apart from the checkpoint files because it guards the whole run dir, metrics included.

The kernel drops a flock when the process holding it ends, however it ends (exit, crash, SIGKILL), so the lock is
never stale: a requeued job takes it again. The file holds the holder's host and pid, for the message. On a
filesystem without flock support (some network filesystems mounted without it) the run goes on with a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from gptoss.errors import CheckpointError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class RunLock:
    """A held run lock; `release` (or the end of the process) lets the next run take it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock


def acquire_run_lock(out: Path) -> RunLock | None:
    """Lock `out` for this process (creating the directory), or raise CheckpointError naming the holder's host and
    pid. None where the filesystem cannot lock (warned)."""
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"--out {out}: cannot create the run lock {path} ({e.strerror})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "host and pid not written yet"
        os.close(fd)
        raise CheckpointError(f"{out} is being written by another training run ({holder}; lock {path}): one run per "
                         "--out; wait for it to end, stop it, or choose another --out") from None
    except OSError as e:
        os.close(fd)
        log.warning("%s: cannot take the run lock (%s); nothing stops a second run from writing %s", path,
                    e.strerror, out)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    return RunLock(path, fd)
