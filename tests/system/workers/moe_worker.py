"""Trains the tiny GPT-OSS inside a real DeepSpeed engine for the expert-parallel tests.

Run under torch.distributed.run with DS_ACCELERATOR=cpu. Every step uses the same global batch, split
over the ranks, so any (world size, ep_size, ZeRO stage) should follow the same trajectory.
Writes losses.json and the full weights (experts under their global ids) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from gptoss.config import get_config
from gptoss.model import ModelOptions, build_model, param_groups
from gptoss.train.distributed import skip_shm_comm_build

GLOBAL_BATCH, SEQ, VOCAB = 8, 24, 256


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep_size", type=int, default=1)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save_at", type=int, default=0, help="save a checkpoint after this many steps")
    ap.add_argument("--load", default="", help="checkpoint dir to resume from")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()

    skip_shm_comm_build()  # as the trainer does: no DeepSpeed op compiles on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_config("tiny", vocab_size=VOCAB, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = build_model(cfg, ep_size=args.ep_size, options=ModelOptions(deepspeed_engine=True))
    micro = GLOBAL_BATCH // world // (2 if world == 1 else 1)  # one rank: 2 micro-batches of 4
    ds_config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero},
        # torch_adam: torch.optim.AdamW, as ds_configs/cpu.json; DeepSpeed's CPU FusedAdam would JIT-compile an op
        # (a minute and a half on 2 cores, again whenever the checkout's path changes).
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                  "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config)
    start = 0
    if args.load:
        engine.load_checkpoint(args.load)
        start = engine.global_steps
    losses = []
    for step in range(start, args.steps):
        batch = global_batch(step)
        accum = GLOBAL_BATCH // (micro * world)
        step_loss = torch.zeros(())
        for a in range(accum):
            row = (rank * accum + a) * micro
            x, y = batch[row:row + micro, :-1], batch[row:row + micro, 1:]
            out = engine(x, targets=y)
            engine.backward(out.loss + out.aux_loss)
            engine.step()
            step_loss += out.loss.detach() / accum
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
        if args.save_at and step + 1 == args.save_at:
            engine.save_checkpoint(os.path.join(args.out, "ckpt"), tag="mid")

    out = Path(args.out)
    state = {}
    for name, p in engine.module.named_parameters():
        state[name] = p.detach().clone()
    # local expert ids -> global ids, so files from all ranks merge into one full state dict
    for block_idx, block in enumerate(engine.module.layers):
        moe = block.mlp
        for local, _ in enumerate(moe.local_experts):
            for pname in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
                local_key = f"layers.{block_idx}.mlp.deepspeed_moe.experts.deepspeed_experts.{local}.{pname}"
                state[f"global.{block_idx}.{moe.first_local_expert + local}.{pname}"] = state.pop(local_key)
    torch.save(state, out / f"weights_rank{rank}.pt")
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    dist.barrier()


if __name__ == "__main__":
    main()
