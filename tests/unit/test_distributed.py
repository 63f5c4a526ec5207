"""Which GPU a rank takes, for every launch layout gptoss supports (the choice is pure: no GPU needed)."""

from __future__ import annotations

import pytest

from gptoss.errors import TrainError
from gptoss.train.distributed import adopt_slurm_env, cuda_device, env_int

LAYOUTS = {
    # name: (environment the launcher sets, GPUs this process sees, the device it must take)
    "deepspeed launcher, rank 3 of 4": ({"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4"}, 4, 3),
    "torchrun, local rank 1 of 8": ({"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}, 8, 1),
    "srun, every GPU visible": ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2"}, 4, 2),
    "srun --gpus-per-task=1": ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}, 1, 0),
    "one process, one GPU": ({}, 1, 0),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_choice_per_launch_layout(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env, visible, expected = LAYOUTS[layout]
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    adopt_slurm_env()
    assert cuda_device(env_int("LOCAL_RANK", 0), visible) == expected


def test_device_choice_refuses_what_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(TrainError, match=r"^LOCAL_RANK=2 but this rank sees only 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"):
        cuda_device(2, 2)
    with pytest.raises(TrainError, match="no CUDA device visible"):
        cuda_device(0, 0)
