"""The head's cross-entropy over a 201k vocabulary without materialising all fp32 logits: one table
`LOSS_KERNELS` of name -> `fn(hidden, weight, targets, chunk_tokens, log_tail_size, pad_rows) -> mean loss`.

- chunked: checkpointed chunks, logits recomputed in backward; the CPU default (BENCHMARKS 11 measures it).
- fused: each chunk's logits made once and turned at once into both gradients; 1.48x faster than chunked at
  the full vocabulary in 0.69x the memory (BENCHMARKS 11), the CUDA default.

`log_tail_size` = ln N: the last row of `weight` is the data vocabulary's shared tail of N ids
(`gptoss.model.head`); its logit + ln N is their total mass, and a target among them has log-probability
log p_tail - ln N. `pad_rows`: the rows just before that tail (`weight[-1 - pad_rows:-1]`) only align the row
count to 64 (`ModelConfig.embedding_rows`); their logits are -inf, so they take no probability and get exactly
zero gradient. Without gradients wanted every kernel is the chunked loss-only walk, so validation numbers never
depend on the training kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptoss.data.sampler import IGNORE_INDEX


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: at most 2^28 logits (1 GiB of fp32), at least 256 tokens."""
    return max(256, (1 << 28) // vocab)


def _wants_grad(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _count(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, log_tail_size: float | None, pad_rows: int) -> torch.Tensor:
    """fp32 logits of one chunk, the tail row raised by ln N and the pad rows -inf (the matmul in the input
    dtype)."""
    logits = F.linear(hidden, weight).float()
    if log_tail_size is not None:
        logits[:, -1] += log_tail_size  # in place: no second vocab-sized tensor
    if pad_rows:
        logits[:, -1 - pad_rows:-1] = float("-inf")
    return logits


def _tail_term(targets: torch.Tensor, rows: int, log_tail_size: float | None) -> torch.Tensor | float:
    """ln N for each target on the tail row (one of its N ids)."""
    return 0.0 if log_tail_size is None else log_tail_size * (targets == rows - 1).sum()


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    log_tail_size: float | None, pad_rows: int) -> torch.Tensor:
    logits = _logits(hidden, weight, log_tail_size, pad_rows)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce + _tail_term(targets, weight.shape[0], log_tail_size)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int | None = None, log_tail_size: float | None = None,
                          pad_rows: int = 0) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T`, chunk by chunk. With more than one chunk each runs under
    activation checkpointing, so forward and backward hold one chunk's logits; a single chunk skips it (it
    would only run the matmul twice)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    recompute = hidden.shape[0] > chunk_tokens and _wants_grad(hidden, weight)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start:start + chunk_tokens], weight, targets[start:start + chunk_tokens], log_tail_size,
                pad_rows)
        total = total + (checkpoint(_chunk_loss_sum, *args, use_reentrant=False) if recompute
                         else _chunk_loss_sum(*args))
    return total / _count(targets)


def _chunk_loss_and_logit_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               log_tail_size: float | None, pad_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the chunk in fp32, d loss_sum / d logits in the input dtype): softmax - onehot, zero on
    ignored rows (and on pad rows: exp(-inf) = 0)."""
    logits = _logits(hidden, weight, log_tail_size, pad_rows)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, safe)[:, 0], 0.0).sum()
    loss = loss + _tail_term(targets, weight.shape[0], log_tail_size)
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, safe, -valid[:, None].to(grad.dtype))
    grad.masked_fill_(~valid[:, None], 0.0)
    return loss, grad.to(hidden.dtype)


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc (fp32 or wider) += grad_logits.T @ hidden, the matmul in the input dtype; on CUDA sm80+ a bf16 matmul
    writes fp32 straight into acc (addmm's out_dtype, torch >= 2.10), elsewhere through a temporary."""
    if acc.dtype == hidden.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    elif acc.is_cuda and torch.cuda.get_device_capability(acc.device)[0] >= 8:
        torch.addmm(acc, grad_logits.t(), hidden, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(grad_logits.t(), hidden).to(acc.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T; gradients computed in forward, scaled in backward (DeepSpeed
    scales the loss by 1 / gradient accumulation, so grad_output is not 1). Kept for backward: grad_hidden and
    grad_weight (fp32), never logits."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                log_tail_size: float | None, pad_rows: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = hidden.new_empty(hidden.shape) if want_hidden else None  # contiguous: rows are out= views
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            loss, grad_logits = _chunk_loss_and_logit_grad(hidden[sl], weight, targets[sl], log_tail_size,
                                                                   pad_rows)
            total += loss
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[sl])
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, hidden[sl])
        count = _count(targets)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output.float() / count
        dh = grad_hidden * scale if grad_hidden is not None else None
        dw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int | None = None, log_tail_size: float | None = None,
                               pad_rows: int = 0) -> torch.Tensor:
    """`chunked_cross_entropy`'s value and gradients without recomputing the logits in backward."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not _wants_grad(hidden, weight):
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens, log_tail_size, pad_rows)
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, log_tail_size, pad_rows)


LossKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int | None, float | None, int], torch.Tensor]
LOSS_KERNELS: dict[str, LossKernel] = {
    "chunked": chunked_cross_entropy,
    "fused": fused_linear_cross_entropy,
}
LOSS_IMPLS = ("auto", *LOSS_KERNELS)


def loss_kernel(impl: str, device: torch.device) -> LossKernel:
    """The kernel `impl` runs on `device`: auto is fused on CUDA, chunked elsewhere."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "chunked"
    return LOSS_KERNELS[impl]
