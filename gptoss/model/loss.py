"""Cross-entropy over a 201k vocabulary without materialising all fp32 logits at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against targets, computed chunk by chunk.

    With more than one chunk, each runs under activation checkpointing, so forward and backward hold the
    logits of one chunk only (about 1 GiB of fp32 at most by default) instead of [tokens x vocab]. When
    everything fits in one chunk (small vocabularies), checkpointing would save nothing and only run the
    logits matmul twice, so it is skipped. Same value and gradient as
    `F.cross_entropy(hidden @ weight.T, targets)`.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = max(256, (1 << 28) // weight.shape[0])
    recompute = hidden.shape[0] > chunk_tokens and torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, hidden[sl], weight, targets[sl], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hidden[sl], weight, targets[sl])
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
