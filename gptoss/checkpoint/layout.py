"""The on-disk format of a checkpoint, in one place for the trainer that writes it and the offline reader.

    <run>/train.lock                    the run lock: one training process writes a run dir (see `lock`)
    <run>/checkpoints/
        latest                          the tag of the newest complete checkpoint of the run (written last, atomically)
        step00000100/                   one tag per save, `step{N:08d}`:
            mp_rank_00_model_states.pt                        DeepSpeed: non-expert weights ("module"), client state
            layer_{M}_expert_{E}_mp_rank_00_model_states.pt   DeepSpeed: MoE layer M, GLOBAL expert id E
            [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt DeepSpeed: rank r's ZeRO-1/2 optimizer partition
            rank{r}_state.pt                                  ours, per rank: RNG states, sampler, step
            train_state.json                                  ours, rank 0, written last: marks the tag complete

train_state.json holds `format_version` (FORMAT_VERSION; anything else is refused), the loop's counters, the model
config and run layout a resume must match, `parent` (the tag this run continued from: the run's chain, which
`--keep_last` prunes and along which an older checkpoint is offered) and the `manifest` of every other file of the
tag (see `manifest`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptoss.config import ConfigError, read_json_object
from gptoss.errors import CheckpointError

FORMAT_VERSION = 2  # 2: a data vocabulary's embedding and head hold `ModelConfig.embedding_rows` (pad rows)
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "train_state.json"
# The keys of train_state.json every reader may rely on (the writer adds tokens, seed, reason, ...).
TRAIN_STATE_KEYS = ("format_version", "step", "model_config", "world_size", "ep_size", "train_batch_size",
                    "seq_len", "story_aware", "parent", "manifest")
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a `step{N}` tag name, None for any other name."""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def expert_file(tag_dir: Path, moe_layer: int, expert: int) -> Path:
    return tag_dir / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank}_state.pt"


# ---- latest ------------------------------------------------------------------------------------------------

def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names: the only checkpoint known to be complete (a save that died never wrote it)."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(f"{latest} is empty; write the tag of a complete checkpoint into it (a step* dir "
                              f"with {TRAIN_STATE}) or choose another --out")
    return tag


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at a verified tag: the commit of a save, or the tag a run resumed from by name."""
    atomic_write(ckpt_dir / LATEST, tag)


# ---- train_state.json --------------------------------------------------------------------------------------

def read_train_state(tag_dir: Path) -> dict[str, Any]:
    """A tag's train_state.json, refused unless it is of this FORMAT_VERSION with every key of TRAIN_STATE_KEYS."""
    path = tag_dir / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {tag_dir} is not a complete gptoss checkpoint")
    try:
        state = read_json_object(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if (found := state.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {found}, this gptoss reads format_version {FORMAT_VERSION}")
    missing = [k for k in TRAIN_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing)} (a format_version {FORMAT_VERSION} file has them)")
    return state


def write_train_state(tag_dir: Path, state: dict[str, Any]) -> None:
    """The commit of a tag's files: written last, atomically, after every other file is on disk."""
    atomic_write(tag_dir / TRAIN_STATE, json.dumps({"format_version": FORMAT_VERSION, **state}, indent=2) + "\n")


# ---- the run's chain ---------------------------------------------------------------------------------------

def _parent(tag_dir: Path) -> Path | None:
    """The tag dir a tag's run continued from, when it still exists (read leniently: a damaged file ends a chain)."""
    try:
        parent = json.loads((tag_dir / TRAIN_STATE).read_text()).get("parent")
    except (OSError, ValueError, AttributeError):
        return None
    step, parent_step = tag_step(tag_dir.name), tag_step(parent) if isinstance(parent, str) else None
    if parent_step is None or step is None or parent_step >= step or not (tag_dir.parent / parent).is_dir():
        return None
    return tag_dir.parent / parent


def ancestors(tag_dir: Path) -> Iterator[Path]:
    """The older tags of tag_dir's chain, newest first; tags the run abandoned (after a --resume_from) are not in
    it. The chain ends at the run's first save or at a parent already pruned."""
    while (parent := _parent(tag_dir)) is not None:
        yield parent
        tag_dir = parent


def prune(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Keep `tag` and the newest `keep_last - 1` tags of its chain, delete the older ones of that chain; nothing
    else is touched. keep_last 0 keeps everything."""
    if keep_last > 0:
        for old in list(ancestors(ckpt_dir / tag))[keep_last - 1:]:
            shutil.rmtree(old, ignore_errors=True)


# ---- durable writes ----------------------------------------------------------------------------------------

def _fsync(path: Path, directory: bool = False) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; durability is then theirs
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(tag_dir: Path) -> None:
    """Flush a tag's files to disk before `latest` names it: after a power loss, `latest` must not point at files
    that existed only in the page cache."""
    for f in tag_dir.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(tag_dir, directory=True)


def atomic_write(path: Path, text: str) -> None:
    """Write then rename: a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)
