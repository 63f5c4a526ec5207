"""Cross-entropy over a 201k vocabulary without materialising all fp32 logits at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    log_tail_size: float | None = None) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    if log_tail_size is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    # Data vocabulary: the last row is the shared tail of N ids; its logit + ln N is their total mass, and a
    # target among them has log-probability log p_tail - ln N.
    tail = logits.shape[-1] - 1
    logits = torch.cat([logits[:, :tail], logits[:, tail:] + log_tail_size], dim=-1)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce + log_tail_size * (targets == tail).sum()


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int | None = None, log_tail_size: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against targets, computed chunk by chunk.

    With more than one chunk, each runs under activation checkpointing, so forward and backward hold the
    logits of one chunk only (about 1 GiB of fp32 at most by default) instead of [tokens x vocab]. When
    everything fits in one chunk (small vocabularies), checkpointing would save nothing and only run the
    logits matmul twice, so it is skipped. Same value and gradient as
    `F.cross_entropy(hidden @ weight.T, targets)`. With `log_tail_size` = ln N (the data vocabulary,
    `gptoss.model.vocab`) the last row of `weight` stands for N ids with that same row, and the result is the
    cross-entropy of that full-vocabulary model.
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
            total = total + checkpoint(_chunk_loss_sum, hidden[sl], weight, targets[sl], log_tail_size,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hidden[sl], weight, targets[sl], log_tail_size)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
