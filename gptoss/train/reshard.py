"""Loading a checkpoint's optimizer state into an engine of another world size or expert-parallel size.

DeepSpeed's ZeRO-1/2 optimizer loads only the partitions of the layout that wrote them, and its universal
checkpoint skips native MoE experts. Every rank therefore rebuilds, from the old partitions read offline
(`OptimizerPartitions`: any parameter whole, global expert ids), exactly the optimizer state file a run of the new
layout would have saved for it (its fp32 master partition and the base optimizer's state tensors of the same
length, each parameter's fragment placed where DeepSpeed's own mapping puts it; the step and hyperparameters as
saved) and hands it to DeepSpeed's ordinary loader. Nothing is written: the checkpoint read stays as it is.
It reads DeepSpeedZeroOptimizer's layout (`bit16_groups`, each parameter's `_hp_mapping`, `param_names`,
`single_partition_of_fp32_groups`; DeepSpeed 0.19), checked before anything is loaded.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from gptoss.checkpoint.read import FP32, OptimizerPartitions, global_expert_name, open_checkpoint
from gptoss.config import ModelConfig
from gptoss.errors import TrainError

log = logging.getLogger(__name__)

_LAYOUT_KEYS = ("params", "name", "moe")  # describe the new engine's groups: never taken from the old ones


def _new_partition(opt: Any, parts: OptimizerPartitions, group: int, key: str, ep_rank: int,
                   local_experts: int, bar: Any) -> torch.Tensor:
    """This rank's flat partition of parameter group `group` for state `key`, filled parameter by parameter."""
    flat = torch.zeros_like(opt.single_partition_of_fp32_groups[group], device="cpu")
    for lp in opt.bit16_groups[group]:
        frag = lp._hp_mapping  # DeepSpeed's link of this parameter to the partition; None: none of it is here
        if frag is None:
            continue
        full = parts.full(global_expert_name(opt.param_names[lp], ep_rank, local_experts), key).reshape(-1)
        numel = frag.lp_fragment_address.numel
        flat.narrow(0, frag.hp_fragment_address.start, numel).copy_(
            full.narrow(0, frag.lp_fragment_address.start, numel))
    bar.update()
    return flat


def load_resharded_optimizer(engine: Any, tag_dir: Any, cfg: ModelConfig, ep_size: int, rank: int) -> None:
    """Fill `engine`'s ZeRO optimizer (fp32 master weights, every state tensor, step, hyperparameters such as the
    LR in use) from the checkpoint `tag_dir` written at another layout."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        PARAM_ALIGNMENT_PADDINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    opt = engine.optimizer
    layout = ("bit16_groups", "param_names", "single_partition_of_fp32_groups", "round_robin_bit16_padding")
    if not all(hasattr(opt, name) for name in layout):
        raise TrainError(f"--resume: resharding {tag_dir} needs DeepSpeed's ZeRO-1/2 optimizer with "
                         f"{', '.join(layout)}; this DeepSpeed's {type(opt).__name__} lacks some: resume with the "
                         "checkpoint's world size and --ep_size")
    from tqdm.auto import tqdm

    old_files = open_checkpoint(tag_dir, config=cfg)
    bar = tqdm(desc=f"reshard {tag_dir.name}", unit="part", disable=rank != 0, dynamic_ncols=True)
    parts = OptimizerPartitions(old_files, tick=bar.update)  # one tick per old rank's file
    saved = parts.ranks[0]  # the step and hyperparameters, the same in every rank's file
    old_groups = saved[BASE_OPTIMIZER_STATE]["param_groups"]
    base = opt.optimizer.state_dict()
    if len(old_groups) != len(base["param_groups"]) or any(
            o.get("moe", False) != n.get("moe", False) or o.get("weight_decay") != n.get("weight_decay")
            for o, n in zip(old_groups, base["param_groups"])):
        raise TrainError(f"--resume: {tag_dir} has optimizer parameter groups "
                         f"{[(g.get('moe', False), g.get('weight_decay')) for g in old_groups]}, this run "
                         f"{[(g.get('moe', False), g.get('weight_decay')) for g in base['param_groups']]}")
    ep_rank, local_experts = rank % ep_size, cfg.num_local_experts // max(ep_size, 1)
    old_state = saved[BASE_OPTIMIZER_STATE]["state"]

    def partitioned(g: int, v: Any) -> bool:  # laid out like the (unpadded) fp32 partition, unlike e.g. a step
        return torch.is_tensor(v) and v.dim() == 1 and v.numel() >= saved[SINGLE_PARTITION_OF_FP32_GROUPS][g].numel()

    bar.total = parts.world + sum(1 + sum(partitioned(g, v) for v in old_state.get(g, {}).values())
                                  for g in range(len(old_groups)))
    state, fp32 = {}, []
    for g, group in enumerate(old_groups):
        state[g] = {k: (_new_partition(opt, parts, g, k, ep_rank, local_experts, bar)
                        if partitioned(g, v) else copy.deepcopy(v))
                    for k, v in old_state.get(g, {}).items()}
        fp32.append(_new_partition(opt, parts, g, FP32, ep_rank, local_experts, bar))
        base["param_groups"][g].update({k: v for k, v in group.items() if k not in _LAYOUT_KEYS})
    sd = {**{k: v for k, v in saved.items() if k not in (BASE_OPTIMIZER_STATE, SINGLE_PARTITION_OF_FP32_GROUPS)},
          BASE_OPTIMIZER_STATE: {"state": state, "param_groups": base["param_groups"]},
          SINGLE_PARTITION_OF_FP32_GROUPS: fp32, PARAM_ALIGNMENT_PADDINGS: opt.round_robin_bit16_padding}
    # DeepSpeed's loader reads the entry of this rank's data-parallel index: the same dict everywhere.
    bar.close()
    opt.load_state_dict([sd] * engine.dp_world_size, load_optimizer_states=True, load_from_fp32_weights=True)
