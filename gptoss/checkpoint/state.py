"""What travels with a checkpoint besides DeepSpeed's weights and optimizer: the loop's counters (`Progress`)
and every RNG stream of a rank, so a resumed run draws the same numbers as one that never stopped. Shared by
the writer (`save`) and the resumer (`resume`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """This rank's python, numpy, torch and (on CUDA) accelerator RNG states; they differ per rank."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": acc.get_rng_state() if acc.device_name() == "cuda" else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` returned (the accelerator's only where there is one to put it on)."""
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None and get_accelerator().device_name() == "cuda":
        get_accelerator().set_rng_state(state["accelerator"])


@dataclass
class Progress:
    """Loop counters that a checkpoint must restore."""

    step: int = 0  # optimizer steps taken (skipped ones included: their batch was consumed)
    bad_in_a_row: int = 0  # consecutive skipped steps
    skipped_total: int = 0
    train_seconds: float = 0.0  # wall-clock in training steps (evaluation and saving excluded), over resumes
