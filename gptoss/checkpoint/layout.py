"""The names of a checkpoint on disk, in one place for the writer, the resumer and the offline reader.

    <run>/train.lock                    the run lock: one training process writes a run dir (see `lock`)
    <run>/checkpoints/
        latest                          the tag of the newest complete checkpoint (written last, atomically)
        step00000100/                   one tag per save, `step{N:08d}`:
            mp_rank_00_model_states.pt                        DeepSpeed: non-expert weights ("module"), client state
            layer_{M}_expert_{E}_mp_rank_00_model_states.pt   DeepSpeed: MoE layer M, GLOBAL expert id E
            [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt DeepSpeed: rank r's ZeRO-1/2 optimizer partition
            rank{r}_state.pt                                  ours, per rank: RNG states, sampler, step
            train_state.json                                  ours, rank 0, written last: marks the tag complete;
                                                              its "manifest" lists every other file of the tag
                                                              with size, crc32 and writer rank (see `manifest`)
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
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a `step{N}` tag name, None for any other name."""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def expert_file(tag_dir: Path, moe_layer: int, expert: int) -> Path:
    return tag_dir / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def missing_expert_message(path: Path, layer: int, expert: int, found: int, total: int) -> str:
    """One missing expert file, for the reader and the manifest check alike."""
    return (f"{path}: expert file missing (layer {layer}, expert {expert}); found {found} of {total} expert files "
            f"in {path.parent}. With expert parallelism each rank writes its own experts: copy the files of every "
            "rank/node")


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


def train_state_file(ckpt_dir: Path, tag: str) -> Path:
    """A tag's train_state.json, which must exist: only a complete save writes it."""
    path = ckpt_dir / tag / TRAIN_STATE
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found; {ckpt_dir / tag} is not a complete gptoss checkpoint")
    return path


def read_train_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads(train_state_file(ckpt_dir, tag).read_text())
