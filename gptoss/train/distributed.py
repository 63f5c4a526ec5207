"""The process group: taking the rank layout from Slurm when `srun` started us, joining (or creating) the group
with a collective timeout that covers DeepSpeed's own groups too, and telling a lost peer from any other error.
Everything that knows about launchers and environment variables lives here."""

from __future__ import annotations

import importlib
import os
import socket
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from gptoss.errors import TrainError


def env_int(name: str, default: int | str) -> int:
    """A launcher's variable (RANK, WORLD_SIZE, LOCAL_RANK) as an int; `default` where none set it."""
    return int(os.environ.get(name, default))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adopt_slurm_env() -> None:
    """`srun python launch/train.py` (one task per GPU, no torchrun): take RANK etc. from Slurm's variables.

    MASTER_ADDR/MASTER_PORT still come from the batch script (the first node of the allocation).
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainError(f"started by srun with {os.environ['SLURM_NTASKS']} tasks but {missing} not set; export "
                         "them in the batch script (the first node and a free port), or launch with torchrun")
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))


# A collective that fails or times out on NCCL: by default torch's watchdog thread aborts the whole process
# (SIGABRT, exit 134, a C++ dump) before Python hears of it. With 2 ("clean up only") the watchdog aborts the
# communicators instead, the next collective raises a DistBackendError, and the trainer ends like a lost rank on
# gloo: one line naming the checkpoint to resume, exit 4.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def cuda_device(local_rank: int, visible: int) -> int:
    """The GPU this rank uses among the `visible` ones. The deepspeed launcher, torchrun and srun without GPU
    binding show every GPU of the node (use LOCAL_RANK); srun with per-task binding (`--gpus-per-task=1`,
    `--gpu-bind=single:1`) shows each task its own one GPU, where LOCAL_RANK may be 1..7 (use 0)."""
    if visible < 1:
        raise TrainError("no CUDA device visible to this rank (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!s}); check the job's GPU request")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise TrainError(f"LOCAL_RANK={local_rank} but this rank sees only {visible} GPUs (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one rank per visible GPU, or "
                         "bind one GPU per task (srun --gpus-per-task=1)")
    return local_rank


def init_distributed(timeout_min: float) -> None:
    """Join (or, run as a plain `python` process, create) the process group, with a collective timeout.

    torch.distributed.run and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; alone we set a 1-rank
    group ourselves, since DeepSpeed would otherwise go looking for MPI.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if get_accelerator().device_name() == "cuda":
        get_accelerator().set_device(cuda_device(env_int("LOCAL_RANK", 0), get_accelerator().device_count()))
        for key, value in NCCL_ENV.items():
            os.environ.setdefault(key, value)  # before the process group exists; a user's own setting wins
    timeout = timedelta(minutes=timeout_min)
    # DeepSpeed builds its data/expert-parallel groups with new_group(ranks), which takes torch's 30-minute
    # default instead of the world group's timeout; ZeRO's gradient reduction and the MoE all-to-all run on
    # those groups, so without this a hung rank stalls the others for 30 minutes whatever --timeout_min says.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if get_accelerator().device_name() == "cpu":
        skip_shm_comm_build()
    deepspeed.init_distributed(timeout=timeout, verbose=False)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce (about 2 minutes with a
    C++ compiler on a machine's first start, and a failure without one). Only `inference_all_reduce` uses it,
    and that falls back to torch.distributed without it; training's collectives are torch.distributed (gloo)
    either way, so nothing changes but the start-up."""
    backend = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm re-exports torch as `torch`
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None


def is_comm_failure(e: BaseException) -> bool:
    """A collective or the rendezvous failed: a peer died, hung past the timeout, or the network broke. Gloo
    reports these as plain RuntimeErrors, so its words are matched too."""
    if isinstance(e, dist.DistError):
        return True
    markers = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Timed out waiting")
    return isinstance(e, RuntimeError) and any(m in str(e) for m in markers)
