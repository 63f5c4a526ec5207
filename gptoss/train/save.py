"""Saving a running engine: the commit protocol that lets `latest` name only complete checkpoints (every file
flushed to disk and described in the manifest before train_state.json and `latest` are written, each atomically),
what travels with DeepSpeed's files (the loop's counters and every RNG stream of a rank, so a resumed run draws the
same numbers as one that never stopped), and the pruning of the run's chain. The file names and train_state.json
are `gptoss.checkpoint.layout`'s, the manifest `gptoss.checkpoint.manifest`'s."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gptoss.checkpoint.layout import (
    fsync_tree,
    prune,
    rank_state_file,
    read_latest,
    tag_for_step,
    write_latest,
    write_train_state,
)
from gptoss.checkpoint.manifest import MANIFEST, describe, manifest_bytes, merge, recording_writes
from gptoss.data import BatchSampler
from gptoss.train.plan import Plan

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Loop counters that a checkpoint must restore."""

    step: int = 0  # optimizer steps taken (skipped ones included: their batch was consumed)
    bad_in_a_row: int = 0  # consecutive skipped steps
    skipped_total: int = 0
    train_seconds: float = 0.0  # wall-clock in training steps (evaluation and saving excluded), over resumes


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
    if state["accelerator"] is not None and get_accelerator().device_name() == "cuda":
        get_accelerator().set_rng_state(state["accelerator"])


def save_checkpoint(engine: Any, plan: Plan, sampler: BatchSampler, prog: Progress, reason: str,
                    parent: str | None) -> str:
    """All ranks: DeepSpeed's files, then one small file per rank, flushed to disk; then rank 0 commits `latest`
    and prunes the run's chain. `parent` is the tag this run saved or resumed from last (None: a new run).

    A crash anywhere before the commit leaves `latest` naming the previous checkpoint, and the half-written
    tag dir is never read (resume follows `latest` only); it is cleared when that step is saved again.
    """
    started = time.perf_counter()
    tag = tag_for_step(prog.step)
    tag_dir = plan.ckpt_dir / tag
    if plan.rank == 0 and tag_dir.exists() and tag != read_latest(plan.ckpt_dir):
        shutil.rmtree(tag_dir)  # the remains of a save that died: no stale file may survive into this one
    dist.barrier()
    state = {
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
        "parent": parent,
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
        fsync_tree(tag_dir)
    parts: list[Any] = [None] * plan.world_size
    dist.all_gather_object(parts, part)  # also the barrier: every node has flushed
    if plan.rank == 0:
        manifest = merge(tag_dir, parts)
        write_train_state(tag_dir, {**state, MANIFEST: manifest})
        write_latest(plan.ckpt_dir, tag)
        prune(plan.ckpt_dir, tag, plan.args.keep_last)
        log.info("saved checkpoint %s (%s; %d files, %.2f GB in %.2fs, of which %.2fs for rank 0's crc32 of "
                 "%.2f GB)", tag_dir, reason, len(manifest["files"]), manifest_bytes(manifest) / 1e9,
                 time.perf_counter() - started, hash_s, sum(e["size"] for e in part.values()) / 1e9)
    dist.barrier()
    return tag
