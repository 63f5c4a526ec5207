"""Activation checkpointing per transformer block, switched on and off like the attention kernel.

While training, each block's forward runs under `torch.utils.checkpoint` (non-reentrant): the backward pass
keeps only the block's inputs and recomputes the rest, about one more forward per step for a fraction of the
activation memory. Separate from the block classes on purpose: the switch swaps a block's class for a subclass
whose forward is checkpointed, so parameter names, state dicts, DeepSpeed checkpoints and exports stay exactly
as they are, and the model code itself knows nothing about it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptoss.model.gpt2 import GPT2Block
from gptoss.model.gptoss import Block


class _Checkpointed:
    """Mixin before a block class: its forward under torch.utils.checkpoint while training with autograd on."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            # GptOss blocks return (x, aux_loss, counts); checkpoint passes any tuple of outputs through.
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


class CheckpointedBlock(_Checkpointed, Block):
    """A GPT-OSS block whose forward is recomputed in the backward pass."""


class CheckpointedGPT2Block(_Checkpointed, GPT2Block):
    """A GPT-2 block whose forward is recomputed in the backward pass."""


_CHECKPOINTED: dict[type[nn.Module], type[nn.Module]] = {Block: CheckpointedBlock, GPT2Block: CheckpointedGPT2Block}
_PLAIN = {v: k for k, v in _CHECKPOINTED.items()}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: `layers` (GPT-OSS) or `h` (GPT-2)."""
    blocks = getattr(model, "layers", None)
    return list(blocks if blocks is not None else getattr(model, "h", []))


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Checkpoint every transformer block's forward while training (enabled), or not; idempotent."""
    for block in transformer_blocks(model):
        plain = _PLAIN.get(type(block), type(block))
        if plain not in _CHECKPOINTED:
            raise TypeError(f"activation checkpointing: unknown block type {plain.__name__}")
        block.__class__ = _CHECKPOINTED[plain] if enabled else plain


def activation_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether every block of the model is checkpointed (False for a model without blocks)."""
    blocks = transformer_blocks(model)
    return bool(blocks) and all(isinstance(b, _Checkpointed) for b in blocks)
