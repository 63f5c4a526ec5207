"""Restoring a checkpoint into a running engine at `--resume`: DeepSpeed's weights, optimizer and LR schedule,
then this rank's sampler position and RNG streams, then the loop's counters, checked to agree with each other.
The checks that need no engine (tag, manifest, model config, layout) ran earlier, in
`gptoss.train.plan`."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from gptoss.checkpoint.layout import rank_state_file
from gptoss.checkpoint.state import Progress, set_rng_state
from gptoss.errors import TrainError

if TYPE_CHECKING:
    from gptoss.data import BatchSampler
    from gptoss.train.plan import Plan

log = logging.getLogger(__name__)


def load_checkpoint(engine: Any, plan: Plan, sampler: BatchSampler) -> Progress:
    """Restore engine (weights, optimizer, LR schedule), sampler, RNG and counters from `plan.resume_tag`."""
    tag = plan.resume_tag
    path, client = engine.load_checkpoint(str(plan.ckpt_dir), tag=tag)
    if path is None:
        raise TrainError(f"--resume: DeepSpeed could not load {plan.ckpt_dir / tag}")
    rank_file = rank_state_file(plan.ckpt_dir / tag, plan.rank)
    mine = torch.load(rank_file, weights_only=False)  # our own file: python/numpy RNG states are pickles
    sampler.load_state_dict(mine["sampler"])
    set_rng_state(mine["rng"])
    # type(default) keeps ints ints; a field added later (train_seconds) starts at its default
    prog = Progress(**{f.name: type(f.default)(client.get(f.name, f.default)) for f in dataclasses.fields(Progress)})
    if engine.global_steps != prog.step or sampler.step != prog.step:
        raise TrainError(f"--resume: {tag} is inconsistent (engine step {engine.global_steps}, sampler step "
                         f"{sampler.step}, trainer step {prog.step})")
    log.info("resumed from %s at step %d", plan.ckpt_dir / tag, prog.step)
    return prog
