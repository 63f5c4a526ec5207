"""One optimizer step and one evaluation, each ending in a single all-reduce of its numbers.

Data: one global batch of `train_batch_size` windows per optimizer step, drawn by a `BatchSampler` with
rank 0 / world 1, so the stream depends only on (seed, step); rank r trains rows
[r * micro * accum, (r + 1) * micro * accum) of it as `accum` micro-batches (`my_rows`). A run on 1 or 64 ranks
with the same DeepSpeed config therefore sees the same data and the same LR schedule, and follows the same
trajectory up to float rounding.

Non-finite steps: DeepSpeed's ZeRO-1/2 optimizer computes the global gradient norm inside `engine.step()`
and, when it is inf/NaN (fp32 always, bf16 with `check_grad_overflow`, the default), zeroes the gradients
and skips the update and the LR-schedule step (`engine.was_step_applied()` is False). A non-finite loss
is backpropagated multiplied by NaN, so its gradients are NaN on purpose and the same skip follows on every
rank (the norm is global). `train_step` only reports a skipped step; the loop counts them and stops after
`max_bad_steps` in a row, when the weights still are those of the last good step. ZeRO stage 0 is refused
(in the plan) because its plain optimizer would apply NaN gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gptoss.data import IGNORE_INDEX, BatchSampler, eval_batches, whole_split_batches
from gptoss.train.plan import Plan


def my_rows(sampler: BatchSampler, plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of the next global batch; advances the sampler by one step."""
    starts = sampler.starts(sampler.step)  # the whole global batch's window starts
    sampler.step += 1
    per_rank = plan.micro * plan.accum
    mine = starts[plan.rank * per_rank:(plan.rank + 1) * per_rank]
    return [plan.train_data.batch(mine[i:i + plan.micro]) for i in range(0, per_rank, plan.micro)]


def story_kw(plan: Plan) -> dict[str, int]:
    """The forward's story-aware argument: attention stays inside each story (see `gptoss.model.Segments`)."""
    return {} if plan.eot_id is None else {"eot_id": plan.eot_id}


@dataclass
class StepStats:
    loss: float  # mean cross-entropy over the global batch
    aux_loss: float
    applied: bool  # False: DeepSpeed skipped the update (non-finite loss or gradient norm)
    stop: bool  # a rank received SIGTERM/SIGUSR1
    grad_norm: float | None
    expert_counts: list[list[float]] | None  # [layers][experts] assignments in this step, all ranks


def train_step(engine: Any, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], plan: Plan,
               stop_requested: bool) -> StepStats:
    """Forward/backward every micro-batch, one optimizer step, then one all-reduce of the step's stats."""
    dev = engine.device
    sums = torch.zeros(4, device=dev)  # loss, aux_loss, non-finite flag, stop flag
    counts = None
    nan = torch.tensor(float("nan"), device=dev)
    for x, y in micro_batches:
        out = engine(x.to(dev, non_blocking=True), targets=y.to(dev, non_blocking=True), **story_kw(plan))
        loss = out.loss + out.aux_loss
        finite = torch.isfinite(loss)
        # A non-finite loss must not yield finite gradients: scale by NaN so DeepSpeed's overflow check skips.
        engine.backward(loss * torch.where(finite, 1.0, nan))
        engine.step()
        sums[0] += out.loss.detach().float()
        sums[1] += out.aux_loss.detach().float()
        sums[2] += (~finite).float()
        if out.expert_counts is not None:
            c = out.expert_counts.detach().float()
            counts = c if counts is None else counts + c
    sums[:2] /= len(micro_batches)
    sums[3] = float(stop_requested)
    packed = sums if counts is None else torch.cat([sums, counts.flatten()])
    dist.all_reduce(packed)
    vals = packed.tolist()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    applied = engine.was_step_applied() and vals[2] == 0
    expert = packed[4:].view(counts.shape).tolist() if counts is not None else None
    return StepStats(loss=vals[0] / plan.world_size, aux_loss=vals[1] / plan.world_size, applied=applied,
                     stop=vals[3] > 0, grad_norm=grad_norm, expert_counts=expert)


@dataclass
class EvalStats:
    loss: float  # mean cross-entropy (nats) per evaluated target
    bpb: float | None  # bits per UTF-8 byte of those targets (<|endoftext|>: 0 bytes); None without a text tokenizer
    targets: int


@torch.no_grad()
def evaluate(engine: Any, plan: Plan) -> EvalStats:
    """Cross-entropy over fixed val windows (`--eval_batches N`) or every target of the split once
    (`--eval_batches all`), shared out over the ranks (equal forwards per rank, which expert parallelism
    needs), summed with one all-reduce: nats, targets and their UTF-8 bytes."""
    data, dev = plan.val_data, engine.device
    if plan.args.eval_batches == "all":
        batches = whole_split_batches(data, plan.micro, rank=plan.rank, world_size=plan.world_size)
    else:
        n = math.ceil(int(plan.args.eval_batches) / plan.world_size) * plan.world_size
        batches = eval_batches(data, plan.micro, n, rank=plan.rank, world_size=plan.world_size)
    table = data.token_bytes()
    byte_table = torch.from_numpy(table).to(dev) if table is not None else None
    engine.eval()
    total = torch.zeros(3, dtype=torch.float64, device=dev)  # nats, targets, bytes
    for x, y in batches:
        x, y = x.to(dev), y.to(dev)
        out = engine(x, targets=y, **story_kw(plan))
        valid = y != IGNORE_INDEX
        total[0] += out.loss.double() * valid.sum()
        total[1] += valid.sum()
        if byte_table is not None:
            total[2] += byte_table[y[valid]].sum()
    engine.train()
    dist.all_reduce(total)
    nats, targets, n_bytes = total.tolist()
    bpb = nats / math.log(2) / n_bytes if byte_table is not None and n_bytes > 0 else None
    return EvalStats(loss=nats / max(targets, 1), bpb=bpb, targets=int(targets))
