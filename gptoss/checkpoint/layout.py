"""The names of a checkpoint on disk, in one place for the writer, the resumer and the offline reader.

    <run>/checkpoints/
        latest                          the tag of the newest complete checkpoint (written last, atomically)
        step00000100/                   one tag per save, `step{N:08d}`:
            mp_rank_00_model_states.pt                        DeepSpeed: non-expert weights ("module"), client state
            layer_{M}_expert_{E}_mp_rank_00_model_states.pt   DeepSpeed: MoE layer M, GLOBAL expert id E
            [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt DeepSpeed: rank r's ZeRO-1/2 optimizer partition
            rank{r}_state.pt                                  ours, per rank: RNG states, sampler, step
            train_state.json                                  ours, rank 0, written last: marks the tag complete
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gptoss.errors import TrainError

CHECKPOINT_FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "train_state.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
EXPERT_FILE_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a `step{N}` tag name, None for any other name."""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def expert_file(tag_dir: Path, moe_layer: int, expert: int) -> Path:
    return tag_dir / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank}_state.pt"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names: the only checkpoint known to be complete (a save that died never wrote it)."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise TrainError(f"{latest} is empty; write the tag of a complete checkpoint into it (a step* dir with "
                         f"{TRAIN_STATE}) or choose another --out")
    return tag


def read_train_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path = ckpt_dir / tag / TRAIN_STATE
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found; {ckpt_dir / tag} is not a complete gptoss checkpoint")
    return json.loads(path.read_text())
