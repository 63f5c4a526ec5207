"""The training loop and its entry point: `main` plans the run, takes the run lock (see `gptoss.checkpoint.lock`) and
decides whether it resumes (every check that needs no process group), then `train` sets up (process group, engine,
restore), runs the steps with evaluation, logging and periodic checkpoints, and saves the final checkpoint. `main`
releases the run lock at the end and turns failures into exit statuses:

    0 done, or stopped by SIGTERM/SIGUSR1 (checkpoint saved)
    2 a user error (flags, config, data, checkpoint, a batch with an id outside the vocabulary): one line
    3 EXIT_BAD_STEPS: --max_bad_steps consecutive non-finite steps (checkpoint of the last good weights)
    4 EXIT_LOST_RANK: a rank died or hung past --timeout_min; one line naming the checkpoint to resume

Fault-injection tests replace `build_engine` and `train_step` in this module: the loop looks them up here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import torch.distributed as dist

from gptoss.checkpoint.layout import read_latest, write_latest
from gptoss.checkpoint.lock import acquire_run_lock
from gptoss.config import flops_per_token
from gptoss.data import BatchSampler
from gptoss.errors import EXIT_USER_ERROR, CheckpointError, UserError
from gptoss.train.args import TrainArgs
from gptoss.train.distributed import adopt_slurm_env, env_int, init_distributed, is_comm_failure
from gptoss.train.engine import build_engine
from gptoss.train.metrics import MetricsLog, memory_stats, peak_flops, run_args
from gptoss.train.plan import Plan, plan_run
from gptoss.train.resume import Resume, decide_resume, restore
from gptoss.train.save import Progress, save_checkpoint
from gptoss.train.step import evaluate, my_rows, train_step

log = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3
EXIT_LOST_RANK = 4


class StopFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, the ranks agree, a checkpoint is saved."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("gptoss.train", "gptoss.checkpoint"):  # every rank knows the same; rank 0 tells
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO dumps the whole config per rank


def main(args: TrainArgs) -> int:
    """Run training; returns the exit status (listed in the module docstring)."""
    _setup_logging(env_int("RANK", os.environ.get("SLURM_PROCID", 0)))
    lock = None
    try:
        adopt_slurm_env()
        plan = plan_run(args)
        # The lock before the checkpoint checks: a second run must hear "in use", not a verdict on a moving target.
        lock = acquire_run_lock(plan.out) if plan.rank == 0 else None
        resume = decide_resume(plan)
    except UserError as e:
        if lock is not None:
            lock.close()
        if env_int("RANK", 0) == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return train(plan, resume)
    except UserError as e:  # found after setup: a checkpoint that does not load, a corrupted batch
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if plan.world_size == 1 or not is_comm_failure(e):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        try:
            tag = read_latest(plan.ckpt_dir)
        except CheckpointError:  # an empty `latest`
            tag = None
        print(f"train.py: error: rank {plan.rank} lost the other ranks ({first.strip()}): a rank died or hung "
              f"longer than --timeout_min={plan.args.timeout_min:g}; fix the cause and restart with --resume "
              f"(latest checkpoint: {tag or 'none'})", file=sys.stderr)
        # Exit now: tearing down a process group whose peer is gone can abort in C++ destructors (SIGABRT,
        # "terminate called without an active exception"), which would hide this exit status from Slurm.
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # a dead launcher can make the flush raise (broken pipe): exit 4 regardless
            os._exit(EXIT_LOST_RANK)
    finally:
        if lock is not None:
            lock.close()  # the next run on this --out may start


def train(plan: Plan, resume: Resume | None) -> int:
    from tqdm.auto import tqdm

    args = plan.args
    init_distributed(args.timeout_min)
    engine = build_engine(plan)
    sampler = BatchSampler(plan.train_data, plan.global_batch, seed=args.seed)  # the global stream, see step.py
    prog = restore(engine, plan, resume, sampler) if resume else Progress()
    if plan.rank == 0:  # the run lock made plan.out
        if resume is not None and resume.repoint_latest:
            write_latest(plan.ckpt_dir, resume.tag)  # --resume_from: the run now continues from this tag
        plan.cfg.save(plan.out / "model_config.json")
        (plan.out / "run_args.json").write_text(json.dumps(run_args(plan), indent=2) + "\n")
    metrics = MetricsLog(plan, prog.step if resume else None)
    log.info("%d rank(s), ep_size %d, global batch %d x %d tokens = %d tokens/step (micro %d x accum %d), "
             "%d steps, %s", plan.world_size, plan.ep_size, plan.global_batch, args.seq_len, plan.tokens_per_step,
             plan.micro, plan.accum, plan.total_steps,
             f"story-aware attention (stories start at id {plan.eot_id})" if plan.eot_id is not None
             else "attention across stories")

    flops = flops_per_token(plan.cfg, args.seq_len)
    peak = peak_flops()
    stop = StopFlag()
    bar = tqdm(total=plan.total_steps, initial=prog.step, disable=plan.rank != 0, unit="step", dynamic_ncols=True)
    last_saved = prog.step if resume else -1
    parent = resume.tag if resume else None  # the run's chain: each save names the tag before it
    window = (prog.step, prog.train_seconds)  # throughput is measured since the last logged record
    exit_code, reason = 0, "final"
    try:
        while prog.step < plan.total_steps:
            lr = engine.get_lr()[0]
            t0 = time.perf_counter()
            stats = train_step(engine, my_rows(sampler, plan), plan, stop.requested)
            prog.train_seconds += time.perf_counter() - t0
            prog.step += 1
            bar.update(1)
            if stats.applied:
                prog.bad_in_a_row = 0
            else:
                prog.bad_in_a_row += 1
                prog.skipped_total += 1
                log.warning("step %d skipped: non-finite loss %.4g or grad norm %s (%d in a row)",
                            prog.step, stats.loss, stats.grad_norm, prog.bad_in_a_row)
            last = prog.step == plan.total_steps
            base = {"step": prog.step, "tokens": prog.step * plan.tokens_per_step, "elapsed_s": prog.train_seconds}
            record = None
            if prog.step % args.log_every == 0 or last or not stats.applied:
                tps = (prog.step - window[0]) * plan.tokens_per_step / max(prog.train_seconds - window[1], 1e-9)
                record = {**base, "loss": stats.loss, "aux_loss": stats.aux_loss, "lr": lr,
                          "grad_norm": stats.grad_norm, "tokens_per_s": tps,
                          "mfu": flops * tps / (peak * plan.world_size) if peak else None,
                          "skipped": not stats.applied, "skipped_total": prog.skipped_total}
                if stats.expert_counts is not None:
                    record["expert_load"] = [[c / max(sum(layer), 1.0) for c in layer]
                                             for layer in stats.expert_counts]
                record.update(memory_stats())
                window = (prog.step, prog.train_seconds)
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}")
            if plan.val_data is not None and (prog.step % args.eval_every == 0 or last):
                val = evaluate(engine, plan)
                record = record or base
                record.update(val_loss=val.loss, val_ppl=math.exp(min(val.loss, 50.0)), val_bpb=val.bpb)
                log.info("step %d: val loss %.4f%s", prog.step, val.loss,
                         f", {val.bpb:.4f} bits/byte" if val.bpb is not None else "")
            if record is not None:
                metrics.write(record)
            if prog.bad_in_a_row >= args.max_bad_steps:
                exit_code, reason = EXIT_BAD_STEPS, "non-finite"
                break
            if stats.stop:
                reason = "signal"
                break
            if args.save_every and prog.step % args.save_every == 0 and not last:
                parent = save_checkpoint(engine, plan, sampler, prog, "periodic", parent)
                last_saved = prog.step
        if last_saved != prog.step:
            save_checkpoint(engine, plan, sampler, prog, reason, parent)
    except BaseException as e:
        exit_code = EXIT_USER_ERROR if isinstance(e, UserError) else 1
        raise
    finally:
        bar.close()
        stop.restore()
        metrics.close(exit_code)
    if exit_code == EXIT_BAD_STEPS and plan.rank == 0:
        print(f"train.py: stopped after {prog.bad_in_a_row} consecutive non-finite steps; the checkpoint at "
              f"step {prog.step} holds the weights of step {prog.step - prog.bad_in_a_row}", file=sys.stderr)
    elif reason == "signal":
        log.info("stopped by signal at step %d; resume with --resume", prog.step)
    dist.barrier()
    dist.destroy_process_group()
    return exit_code
