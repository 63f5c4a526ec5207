"""The checkpoint format without an engine: `latest`, train_state.json's format version and keys, and the run's
chain that --keep_last prunes and along which an older checkpoint is offered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss.checkpoint.layout import (
    TRAIN_STATE_KEYS,
    ancestors,
    prune,
    read_latest,
    read_train_state,
    write_latest,
    write_train_state,
)
from gptoss.errors import CheckpointError


def save(ckpt: Path, step: int, parent: int | None) -> None:
    """A tag dir holding only its train_state.json, as the trainer's save writes it."""
    tag_dir = ckpt / f"step{step:08d}"
    tag_dir.mkdir()
    state = {k: None for k in TRAIN_STATE_KEYS if k != "format_version"}
    write_train_state(tag_dir, {**state, "step": step, "parent": None if parent is None else f"step{parent:08d}"})


def tags(ckpt: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in ckpt.glob("step*"))


def test_keep_last_prunes_the_chain_and_nothing_else(tmp_path):
    """Saves 1-5; a run resumed from 3 saves 4' (replacing 4), 6 and 7; 5 was abandoned; 9 is a save that died."""
    for step, parent in ((1, None), (2, 1), (3, 2), (4, 3), (5, 4)):
        save(tmp_path, step, parent)
    (tmp_path / "step00000004" / "train_state.json").unlink()  # the resumed run replaces 4 ...
    (tmp_path / "step00000004").rmdir()
    for step, parent in ((4, 3), (6, 4), (7, 6)):  # ... and goes on from there
        save(tmp_path, step, parent)
    (tmp_path / "step00000009").mkdir()
    assert [p.name for p in ancestors(tmp_path / "step00000007")] == [f"step0000000{s}" for s in (6, 4, 3, 2, 1)]
    prune(tmp_path, "step00000007", keep_last=0)  # 0 keeps everything
    assert tags(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 9]
    prune(tmp_path, "step00000007", keep_last=3)
    assert tags(tmp_path) == [4, 5, 6, 7, 9]  # 5, abandoned, takes no slot and stays; so does the dead save
    prune(tmp_path, "step00000007", keep_last=1)
    assert tags(tmp_path) == [5, 7, 9]
    assert list(ancestors(tmp_path / "step00000007")) == []  # the chain ends at a pruned parent


def test_latest_is_read_and_written_in_one_place(tmp_path):
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, "step00000003")
    assert read_latest(tmp_path) == "step00000003"
    (tmp_path / "latest").write_text("\n")
    with pytest.raises(CheckpointError, match="latest is empty; write the tag of a complete checkpoint"):
        read_latest(tmp_path)


def test_train_state_of_another_format_or_without_its_keys_is_refused(tmp_path):
    save(tmp_path, 1, None)
    tag_dir = tmp_path / "step00000001"
    assert read_train_state(tag_dir)["format_version"] == 2
    path = tag_dir / "train_state.json"
    state = json.loads(path.read_text())
    for version in (1, None, "2"):  # 1: a data vocabulary's head without its pad rows
        path.write_text(json.dumps({**state, "format_version": version}))
        with pytest.raises(CheckpointError) as e:
            read_train_state(tag_dir)
        assert str(e.value) == f"{path}: format_version {version}, this gptoss reads format_version 2"
    path.write_text(json.dumps({k: v for k, v in state.items() if k != "parent"}))
    with pytest.raises(CheckpointError, match="train_state.json: no parent"):
        read_train_state(tag_dir)
    path.unlink()
    with pytest.raises(CheckpointError, match="step00000001 is not a complete gptoss checkpoint"):
        read_train_state(tag_dir)
