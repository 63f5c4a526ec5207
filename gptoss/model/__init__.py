"""Models: GPT-OSS and the GPT-2 baseline, plus what the trainer needs to build and optimise them."""

from __future__ import annotations

import torch
from torch import nn

from gptoss.config import ModelConfig
from gptoss.model.attention import KVCache
from gptoss.model.gpt2 import GPT2
from gptoss.model.gptoss import GptOss, ModelOutput
from gptoss.model.kernels.attention import ATTENTION_IMPLS, Segments
from gptoss.model.moe import MoEFeedForward, deepspeed_moe_class, validate_parallelism
from gptoss.model.options import DEFAULT_OPTIONS, ModelOptions


def build_model(cfg: ModelConfig, ep_size: int = 1, device: torch.device | str | None = None,
                options: ModelOptions = DEFAULT_OPTIONS) -> nn.Module:
    """Build and initialise a model from torch's global RNG (call `torch.manual_seed` first), its kernels,
    activation checkpointing and compilation as `options` say.

    The same seed gives the same full weights for any ep_size (each rank keeps its experts' slice).
    On the meta device nothing is allocated or initialised (for counting the 20b/120b presets).
    """
    with torch.device(device or "cpu"):
        model = GptOss(cfg, ep_size, options) if cfg.arch == "gpt_oss" else GPT2(cfg, options)
    if str(device) != "meta":
        model.reset_parameters()
    if options.compile:  # each block in place: parameter names, state dicts and DeepSpeed's view unchanged
        for block in model.layers if isinstance(model, GptOss) else model.h:
            block.compile(backend=options.compile_backend)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only (no decay on norms, biases, sinks, embeddings), then split
    into DeepSpeed's MoE groups so expert parameters are reduced over their expert-data-parallel group (a GPT-OSS
    model built with `ModelOptions(deepspeed_engine=True)`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and not name.startswith(("embed_tokens", "wte", "wpe"))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    moe_layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if moe_layers:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        if not all(isinstance(m, deepspeed_moe_class()) for m in moe_layers):
            # Plain layers: the engine would see no MoE and reduce the experts over the whole data-parallel group.
            raise ValueError("param_groups is for a DeepSpeed engine: build the model with "
                             "ModelOptions(deepspeed_engine=True) so the engine sees its MoE layers")
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


__all__ = ["ATTENTION_IMPLS", "GPT2", "GptOss", "KVCache", "ModelOptions", "ModelOutput", "Segments", "build_model",
           "param_groups", "validate_parallelism"]
