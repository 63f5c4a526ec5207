"""Restores a checkpoint into a real DeepSpeed engine of the layout given by the launch (world size, --ep_size)
exactly as `launch/train.py --resume` does, then checks on every rank, against the saved partitions read offline,
that each parameter's fp32 master weights and Adam moments equal the saved ones element for element (global expert
ids mapped), the step count and LR carried over, and the RNG streams are old rank (rank mod old world)'s.
Takes train.py's flags; writes reshard_check_rank{r}.json to --out.
"""

from __future__ import annotations

import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from gptoss.checkpoint.layout import rank_state_file
from gptoss.checkpoint.read import FP32, OptimizerPartitions, global_expert_name, open_checkpoint
from gptoss.data import BatchSampler
from gptoss.train import arg_parser, args_from_namespace
from gptoss.train.distributed import init_distributed
from gptoss.train.engine import build_engine
from gptoss.train.plan import plan_run
from gptoss.train.resume import decide_resume, restore


def main() -> None:
    plan = plan_run(args_from_namespace(arg_parser("").parse_args()))
    resume = decide_resume(plan)
    init_distributed(plan.args.timeout_min)
    engine = build_engine(plan)
    prog = restore(engine, plan, resume, BatchSampler(plan.train_data, plan.global_batch, seed=plan.args.seed))
    tag_dir = plan.ckpt_dir / resume.tag
    parts = OptimizerPartitions(open_checkpoint(tag_dir))
    ep_rank, local = plan.rank % plan.ep_size, plan.cfg.num_local_experts // plan.ep_size
    engine.optimizer._lazy_init_hp_params_optimizer_state()  # what its first step does: link the moments
    mismatched, compared = [], 0
    for name, p in engine.module.named_parameters():
        saved_name = global_expert_name(name, ep_rank, local)
        for key in (FP32, "exp_avg", "exp_avg_sq"):
            mine = safe_get_full_fp32_param(p) if key == FP32 else safe_get_full_optimizer_state(p, key)
            compared += 1
            if not torch.equal(mine.cpu(), parts.full(saved_name, key)):
                mismatched.append(f"{name} {key}")
    saved_state = parts.ranks[0]["base_optimizer_state"]
    old_rank = plan.rank % resume.saved_layout[0] if resume.saved_layout else plan.rank
    rng = torch.load(rank_state_file(tag_dir, old_rank), weights_only=False)["rng"]
    steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    result = {"mismatched": mismatched, "compared": compared, "resharded": resume.saved_layout is not None,
              "step": prog.step, "optimizer_steps": sorted(steps),
              "saved_optimizer_steps": sorted({float(s["step"]) for s in saved_state["state"].values()}),
              "lr": [g["lr"] for g in engine.optimizer.optimizer.param_groups],
              "saved_lr": [g["lr"] for g in saved_state["param_groups"]],
              "rng_is_old_ranks": torch.equal(torch.get_rng_state(), rng["torch"])}
    (plan.out / f"reshard_check_rank{plan.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
