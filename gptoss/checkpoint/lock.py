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
from typing import BinaryIO

from gptoss.errors import CheckpointError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


def acquire_run_lock(out: Path) -> BinaryIO | None:
    """Lock `out` for this process (creating the directory): the open lock file, whose `close` (or the end of the
    process) lets the next run take it. Raises CheckpointError naming the holder's host and pid; None where the
    filesystem cannot lock (warned)."""
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
    except OSError as e:
        raise CheckpointError(f"--out {out}: cannot create the run lock {path} ({e.strerror})") from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read(4096).decode(errors="replace").strip() or "host and pid not written yet"
        f.close()
        raise CheckpointError(f"{out} is being written by another training run ({holder}; lock {path}): one run per "
                              "--out; wait for it to end, stop it, or choose another --out") from None
    except OSError as e:
        f.close()
        log.warning("%s: cannot take the run lock (%s); nothing stops a second run from writing %s", path,
                    e.strerror, out)
        return None
    f.truncate(0)
    f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return f  # closing the only descriptor drops the flock
