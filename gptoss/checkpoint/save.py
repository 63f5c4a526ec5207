"""The file that saves a checkpoint during training: the commit protocol that lets `latest` name only complete
checkpoints (every file flushed to disk and described in the manifest before train_state.json and `latest` are
written, each atomically), and the pruning of old ones. The file names are in `layout`, what a rank's own file
holds in `state`, the manifest in `manifest`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptoss.checkpoint.layout import (
    CHECKPOINT_FORMAT,
    LATEST,
    TRAIN_STATE,
    latest_tag,
    rank_state_file,
    tag_for_step,
    tag_step,
)
from gptoss.checkpoint.manifest import MANIFEST, describe, manifest_bytes, merge, recording_writes
from gptoss.checkpoint.state import Progress, rng_state

if TYPE_CHECKING:
    from gptoss.data import BatchSampler
    from gptoss.train.plan import Plan

log = logging.getLogger(__name__)


def save_checkpoint(engine: Any, plan: Plan, sampler: BatchSampler, prog: Progress, reason: str) -> str:
    """All ranks: DeepSpeed's files, then one small file per rank, flushed to disk; then rank 0 commits `latest`.

    A crash anywhere before the commit leaves `latest` naming the previous checkpoint, and the half-written
    tag dir is never read (resume follows `latest` only); it is cleared when that step is saved again.
    """
    import torch.distributed as dist

    started = time.perf_counter()
    tag = tag_for_step(prog.step)
    tag_dir = plan.ckpt_dir / tag
    if plan.rank == 0 and tag_dir.exists() and tag != latest_tag(plan.ckpt_dir):
        shutil.rmtree(tag_dir)  # the remains of a save that died: no stale file may survive into this one
    dist.barrier()
    state = {
        "format": CHECKPOINT_FORMAT,
        "tokens": prog.step * plan.tokens_per_step,
        "model_config": plan.cfg.to_dict(),
        "world_size": plan.world_size,
        "ep_size": plan.ep_size,
        "train_batch_size": plan.global_batch,
        "micro_batch_size": plan.micro,
        "seq_len": plan.args.seq_len,
        "seed": plan.args.seed,
        "story_aware": plan.eot_id is not None,
        "total_steps": plan.total_steps,
        **dataclasses.asdict(prog),  # step, bad_in_a_row, skipped_total, train_seconds
        "reason": reason,  # "periodic", "final", "signal" or "non-finite"
        "sampler": sampler.state_dict(),
    }
    with recording_writes(engine) as written:
        engine.save_checkpoint(str(plan.ckpt_dir), tag=tag, client_state=state, save_latest=False)
    # DeepSpeed's client_state is written by rank 0 only; RNG streams differ per rank.
    mine = rank_state_file(tag_dir, plan.rank)
    torch.save({"rng": rng_state(), "sampler": sampler.state_dict(), "step": prog.step}, mine)
    t0 = time.perf_counter()
    part = describe(tag_dir, [*written, mine], plan.rank)  # what this rank wrote, hashed while in the page cache
    hash_s = time.perf_counter() - t0
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one rank per node flushes what its node wrote
        _fsync_tree(tag_dir)
    parts: list[Any] = [None] * plan.world_size
    dist.all_gather_object(parts, part)  # also the barrier: every node has flushed
    if plan.rank == 0:
        manifest = merge(tag_dir, parts)
        _atomic_write(tag_dir / TRAIN_STATE, json.dumps({**state, MANIFEST: manifest}, indent=2) + "\n")
        commit_latest(plan.ckpt_dir, tag)
        prune_checkpoints(plan.ckpt_dir, plan.args.keep_last, keep=tag)
        log.info("saved checkpoint %s (%s; %d files, %.2f GB in %.2fs, of which %.2fs for rank 0's crc32 of "
                 "%.2f GB)", tag_dir, reason, len(manifest["files"]), manifest_bytes(manifest) / 1e9,
                 time.perf_counter() - started, hash_s, sum(e["size"] for e in part.values()) / 1e9)
    dist.barrier()
    return tag


def commit_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at a verified tag: the commit of a save, or the tag a run resumed from by name."""
    _atomic_write(ckpt_dir / LATEST, tag)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; durability is then theirs to give
        pass
    finally:
        os.close(fd)


def _fsync_tree(tag_dir: Path) -> None:
    """Flush a checkpoint's files to disk before `latest` names it: after a power loss, `latest` must not point
    at files that existed only in the page cache."""
    for f in tag_dir.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(tag_dir, directory=True)


def _atomic_write(path: Path, text: str) -> None:
    """Write then rename: a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Keep `keep` (the tag `latest` names, whose manifest the save has just written: the newest
    verified checkpoint, never deleted) and the newest `keep_last - 1` complete checkpoints before it; delete older
    ones and the remains of saves that died (no train_state.json). Tags after `keep` (a run resumed from an older
    tag with --resume_from) are left alone. keep_last 0 keeps everything."""
    keep_step = tag_step(keep)
    if keep_last <= 0 or keep_step is None:
        return
    steps = {p: tag_step(p.name) for p in ckpt_dir.glob("step*") if p.is_dir()}
    older = sorted((p for p, step in steps.items() if step is not None and step < keep_step), key=steps.get)
    complete = [p for p in older if (p / TRAIN_STATE).is_file()]
    kept = {p.name for p in complete[-(keep_last - 1):]} if keep_last > 1 else set()
    for old in older:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
