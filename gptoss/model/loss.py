"""Cross-entropy over a 201k vocabulary without materialising all fp32 logits at once, and the switch between
its implementations: the checkpointed chunks here, the fused one (`gptoss.model.fused_loss`), liger-kernel's."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptoss.errors import UserError

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "chunked", "fused", "liger")


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: at most 2^28 logits (1 GiB of fp32), at least 256 tokens."""
    return max(256, (1 << 28) // vocab)


def liger_available() -> bool:
    """Whether liger-kernel is installed (found, not imported: importing it needs triton)."""
    return importlib.util.find_spec("liger_kernel") is not None


def check_loss_impl(impl: str, flag: str = "loss implementation") -> None:
    """A clear UserError for an unknown name, or for liger without liger-kernel installed."""
    if impl not in LOSS_IMPLS:
        raise UserError(f"{flag}={impl}: expected one of {', '.join(LOSS_IMPLS)}")
    if impl == "liger" and not liger_available():
        raise UserError(f"{flag}=liger needs liger-kernel, which is not installed: pip install 'gptoss[gpu]' "
                        "(an offline GPU machine: scripts/gpu_wheels.sh packs its wheel; install it with --no-deps)")


def set_loss_impl(model: nn.Module, impl: str) -> None:
    """Choose the head loss of a GPT-OSS or GPT-2 model: "auto" (fused on CUDA, chunked elsewhere), "chunked"
    (checkpointed chunks, logits recomputed in backward), "fused" (gradients computed in the forward pass, pure
    torch), "liger" (liger-kernel, CUDA only). All give the same loss and gradients up to rounding."""
    check_loss_impl(impl)
    model.loss_impl = impl


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` runs on `device`: auto is fused on CUDA, chunked (unchanged) elsewhere."""
    if impl == "auto":
        return "fused" if device.type == "cuda" else "chunked"
    if impl not in LOSS_IMPLS:
        check_loss_impl(impl)  # raises
    return impl


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, impl: str = "auto",
                       log_tail_size: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` by implementation `impl` (same value and gradients for all)."""
    impl = resolve_loss_impl(impl, hidden.device)
    if impl == "chunked":
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens, log_tail_size)
    from gptoss.model import fused_loss  # it imports this module

    fn = fused_loss.fused_linear_cross_entropy if impl == "fused" else fused_loss.liger_linear_cross_entropy
    return fn(hidden, weight, targets, chunk_tokens, log_tail_size)


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
        chunk_tokens = default_chunk_tokens(weight.shape[0])
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
