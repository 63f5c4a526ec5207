"""Resuming: the decision (`decide_resume`, a value computed before any process group from the plan and the
checkpoint on disk, with every check that needs no engine) and the restore of a running engine from it
(`restore`: DeepSpeed's weights, optimizer and LR schedule, then this rank's sampler position and RNG streams,
then the loop's counters, checked to agree with each other).

A checkpoint of another world size or --ep_size resumes too (`gptoss.train.reshard` rebuilds the optimizer
partitions): the global batch, --seq_len and story-awareness must stay, since they set the data stream and the LR
schedule. The data order is one global stream, so the sampler state is the same in every rank's file. Rank r takes
the RNG streams of old rank r mod the old world size: nothing in training draws from them (no dropout; the data
order is seeded by step), so they only need to be deterministic."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptoss.checkpoint.layout import rank_state_file, read_latest, read_train_state
from gptoss.checkpoint.manifest import check_checkpoint
from gptoss.data import BatchSampler
from gptoss.errors import TrainError
from gptoss.train.plan import Plan
from gptoss.train.reshard import load_resharded_optimizer
from gptoss.train.save import Progress, set_rng_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """The checkpoint tag a run continues from; `repoint_latest` when it was chosen by name (--resume_from), so
    `latest` must name it before the run goes on."""

    tag: str
    repoint_latest: bool
    saved_layout: tuple[int, int] | None = None  # (world size, ep size) when it differs from this run's


def _resume_from_tag(a: Any, ckpt_dir: Path) -> str:
    tag = a.resume_from
    if not tag or Path(tag).name != tag or not (ckpt_dir / tag).is_dir():
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise TrainError(f"--resume_from {tag}: no checkpoint tag {ckpt_dir / str(tag)}; pass the name of a tag "
                         f"directory of {ckpt_dir}" + (f", one of {', '.join(tags)}" if tags else " (there are none)"))
    return tag


def decide_resume(plan: Plan) -> Resume | None:
    """--resume (`latest`) or --resume_from TAG only onto a checkpoint that verifies against its manifest, of the
    same model and layout; no new run over an old one. A tag that fails verification stops the run: the line names
    the newest older tag of its chain that verifies, for --resume_from (the user decides)."""
    a, ckpt_dir = plan.args, plan.ckpt_dir
    if a.resume_from is not None:  # whatever `latest` says, even when it is broken
        flag, tag = "--resume_from", _resume_from_tag(a, ckpt_dir)
    else:
        flag, tag = "--resume", read_latest(ckpt_dir)
        if not a.resume:
            if tag is not None:
                raise TrainError(f"{a.out} already holds checkpoints (latest: {tag}); pass --resume to continue "
                                 "that run or choose another --out")
            return None
    if tag is None:
        raise TrainError(f"--resume: no checkpoint to resume in {ckpt_dir} (no 'latest' file); "
                         "drop --resume to start a new run")
    state = read_train_state(ckpt_dir / tag)
    # Every rank checks the sizes (a stat per file, the same verdict everywhere); the checksums, which read every
    # byte, rank 0 alone: the others wait for it at the rendezvous, and its exit 2 stops them through the launcher.
    check_checkpoint(ckpt_dir / tag, a.verify_checkpoint and plan.rank == 0, "resume from it with --resume_from",
                     prefix=f"{flag}: ")
    saved_cfg, cfg = state["model_config"], plan.cfg.to_dict()
    _check_same_vocabulary(tag, saved_cfg.get("kept_ids"), cfg.get("kept_ids"))
    if saved_cfg != cfg:
        diff = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {cfg.get(k)!r}"
                         for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k))
        raise TrainError(f"--resume: checkpoint {tag} was trained with another model config ({diff}); "
                         f"use the same --model, or a new --out to start over")
    layout = {"train_batch_size": plan.global_batch, "seq_len": a.seq_len, "story_aware": plan.eot_id is not None}
    changed = {k: (state[k], v) for k, v in layout.items() if state[k] != v}
    if changed:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        raise TrainError(f"--resume: checkpoint {tag} was written with another layout ({what}); resume with "
                         "the same train_batch_size, --seq_len and --attend_across_stories (they set the LR "
                         "schedule and the data stream)")
    saved = (state["world_size"], state["ep_size"])
    moved = saved != (plan.world_size, plan.ep_size)
    if moved:
        log.info("resharding %s: world %d ep %d -> world %d ep %d", tag, *saved, plan.world_size, plan.ep_size)
    return Resume(tag, repoint_latest=a.resume_from is not None, saved_layout=saved if moved else None)


def _check_same_vocabulary(tag: str, saved: list[int] | None, mine: list[int] | None) -> None:
    """One line, not a diff of thousands of ids, when the kept set (--vocab data) differs from the checkpoint's."""
    if saved == mine:
        return
    detail = ""
    if saved is not None and mine is not None:
        s, m = set(saved), set(mine)
        detail = f" ({len(m - s)} ids new, {len(s - m)} no longer used)"
    raise TrainError(f"--resume: checkpoint {tag} was trained with {_vocabulary(saved)}, this run has "
                     f"{_vocabulary(mine)}{detail}; resume with the same --vocab and --data, or a new --out to "
                     "start over")


def _vocabulary(kept_ids: list[int] | None) -> str:
    return "the full vocabulary" if kept_ids is None else f"a data vocabulary of {len(kept_ids)} kept ids"


def restore(engine: Any, plan: Plan, resume: Resume, sampler: BatchSampler) -> Progress:
    """Restore engine (weights, optimizer, LR schedule), sampler, RNG and counters from `resume.tag`."""
    tag, started = resume.tag, time.perf_counter()
    # At another layout DeepSpeed loads the model (expert files are per global id), the LR schedule and its
    # counters; the optimizer partitions are rebuilt for this layout from the saved ones.
    path, client = engine.load_checkpoint(str(plan.ckpt_dir), tag=tag,
                                          load_optimizer_states=resume.saved_layout is None)
    if path is None:
        raise TrainError(f"--resume: DeepSpeed could not load {plan.ckpt_dir / tag}")
    rank = plan.rank
    if resume.saved_layout is not None:
        load_resharded_optimizer(engine, plan.ckpt_dir / tag, plan.cfg, plan.ep_size, plan.rank)
        rank %= resume.saved_layout[0]  # rank r continues the RNG streams of old rank r mod the old world size
    mine = torch.load(rank_state_file(plan.ckpt_dir / tag, rank), weights_only=False)  # pickled RNG states
    sampler.load_state_dict(mine["sampler"])  # the global stream: the same state in every rank's file
    set_rng_state(mine["rng"])
    prog = Progress(**{f.name: client[f.name] for f in dataclasses.fields(Progress)})
    if engine.global_steps != prog.step or sampler.step != prog.step:
        raise TrainError(f"--resume: {tag} is inconsistent (engine step {engine.global_steps}, sampler step "
                         f"{sampler.step}, trainer step {prog.step})")
    log.info("resumed from %s at step %d (%s in %.2fs)", plan.ckpt_dir / tag, prog.step,
             "resharded" if resume.saved_layout else "loaded", time.perf_counter() - started)
    return prog
