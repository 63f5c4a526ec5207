"""The DeepSpeed engine: the model built from the seed (attention kernel, loss head and activation checkpointing
as the flags say), our parameter groups, `deepspeed.initialize` and the one fix-up of its LR schedule. The only
place the trainer creates a model; fault-injection tests wrap `build_engine` to reach the engine's parameters."""

from __future__ import annotations

from typing import Any

import torch

from gptoss.train.plan import Plan

COMPILE_BACKEND_ENV = "GPTOSS_COMPILE_BACKEND"  # tests pick a cheaper backend (aot_eager) than inductor


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (`Module.compile`): parameter names, state dicts and
    DeepSpeed's view of the model stay as they are. The loss head (--loss_impl) stays eager."""
    import os

    from gptoss.model.checkpointing import transformer_blocks

    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    for block in transformer_blocks(model):
        block.compile(backend=backend)


def build_engine(plan: Plan) -> Any:
    """Model from the seed, then DeepSpeed's engine with our parameter groups (no decay on norms etc.)."""
    import deepspeed

    from gptoss.model import build_model, param_groups, set_activation_checkpointing, set_attention_impl
    from gptoss.model.loss import set_loss_impl

    torch.manual_seed(plan.args.seed)
    model = build_model(plan.cfg, ep_size=plan.ep_size)
    set_attention_impl(model, plan.args.attn_impl)
    set_loss_impl(model, plan.args.loss_impl)
    set_activation_checkpointing(model, plan.args.activation_checkpointing)
    if plan.args.compile:
        compile_blocks(model)
    wd = float(plan.ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd), config=plan.ds_config)
    sched = engine.lr_scheduler
    if getattr(sched, "last_batch_iteration", None) == -1:
        # DeepSpeed's warmup schedules start at iteration -1, where the LR is 0: step 1 would be wasted.
        # Moving to iteration 0 makes step k use iteration k - 1 (warmup_min_ratio first, cos_min_ratio last).
        sched.step()
    return engine
