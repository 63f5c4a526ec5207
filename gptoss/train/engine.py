"""The DeepSpeed engine: the model built from the seed (attention kernel, loss head and activation checkpointing
as the flags say), our parameter groups, `deepspeed.initialize` and the one fix-up of its LR schedule. The only
place the trainer creates a model; fault-injection tests wrap `build_engine` to reach the engine's parameters."""

from __future__ import annotations

import os
from typing import Any

import torch

from gptoss.train.plan import Plan


def build_engine(plan: Plan) -> Any:
    """Model from the seed, then DeepSpeed's engine with our parameter groups (no decay on norms etc.)."""
    import deepspeed

    from gptoss.model import ModelOptions, build_model, param_groups
    from gptoss.model.options import COMPILE_BACKEND_ENV

    a = plan.args
    options = ModelOptions(attention=a.attn_impl, loss=a.loss_impl, activation_checkpointing=a.activation_checkpointing,
                           compile=a.compile, compile_backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"),
                           deepspeed_engine=True)
    torch.manual_seed(a.seed)
    model = build_model(plan.cfg, ep_size=plan.ep_size, options=options)
    wd = float(plan.ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd), config=plan.ds_config)
    sched = engine.lr_scheduler
    if getattr(sched, "last_batch_iteration", None) == -1:
        # DeepSpeed's warmup schedules start at iteration -1, where the LR is 0: step 1 would be wasted.
        # Moving to iteration 0 makes step k use iteration k - 1 (warmup_min_ratio first, cos_min_ratio last).
        sched.step()
    return engine
