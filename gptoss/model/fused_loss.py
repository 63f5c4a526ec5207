"""Fused linear cross-entropy: the head's loss and both of its gradients in one walk over token chunks.

Why: `chunked_cross_entropy` never holds all [tokens x vocab] logits, but its checkpointed chunks run the logits
matmul again in the backward pass (four vocab-sized matmuls per step instead of three). Here each chunk's
logits are made once, in the forward pass, and turned at once into the gradients w.r.t. the hidden chunk and
the weight; the backward pass only scales those two by its incoming gradient (DeepSpeed scales the loss by
1 / gradient accumulation, so that is not 1). What lives from forward to backward is grad_hidden
[tokens x hidden] and grad_weight [vocab x hidden] (fp32), never logits.

`liger_linear_cross_entropy` is the same contract through liger-kernel's Triton kernel (optional, CUDA only,
imported lazily; `pip install 'gptoss[gpu]'`). Without gradients wanted (evaluation, `torch.no_grad`, or
neither input requiring grad) both are the chunked loss-only walk, so validation numbers never depend on the
training kernel.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from gptoss.errors import UserError
from gptoss.model.loss import IGNORE_INDEX, chunked_cross_entropy, default_chunk_tokens


def _wants_grad(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _chunk_loss_and_logit_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               log_tail_size: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the chunk in fp32, d loss_sum / d logits in the input dtype): softmax - onehot, zero on
    ignored rows. The matmul runs in the input dtype, everything after it in fp32, as in the chunked path."""
    logits = F.linear(hidden, weight).float()
    if log_tail_size is not None:  # the shared tail row stands for N ids: its logit + ln N is their total mass
        logits[:, -1] += log_tail_size
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, safe)[:, 0], 0.0).sum()
    if log_tail_size is not None:  # a target among the N tail ids has log-probability log p_tail - ln N
        loss = loss + log_tail_size * (targets == weight.shape[0] - 1).sum()
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, safe, -valid[:, None].to(grad.dtype))
    grad.masked_fill_(~valid[:, None], 0.0)
    return loss, grad.to(hidden.dtype)


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc (fp32 or wider) += grad_logits.T @ hidden, the matmul in the input dtype. On CUDA (sm80+) a bf16/fp16 matmul
    writes fp32 straight into acc (addmm's out_dtype); elsewhere through a temporary."""
    if acc.dtype == hidden.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    elif acc.is_cuda and torch.cuda.get_device_capability(acc.device)[0] >= 8:
        torch.addmm(acc, grad_logits.t(), hidden, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(grad_logits.t(), hidden).to(acc.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                log_tail_size: float | None) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = hidden.new_empty(hidden.shape) if want_hidden else None  # contiguous: rows are out= views
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights: fp32 sums
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            loss, grad_logits = _chunk_loss_and_logit_grad(hidden[sl], weight, targets[sl], log_tail_size)
            total += loss
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[sl])
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, hidden[sl])
            del grad_logits
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output.float() / count  # d mean / d sum, times what came from above
        dh = grad_hidden * scale if grad_hidden is not None else None
        dw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int | None = None, log_tail_size: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX rows skipped), with
    `chunked_cross_entropy`'s arguments, value and gradients, but without recomputing the logits in backward.
    `log_tail_size` = ln N: the last row of `weight` is the data vocabulary's shared tail of N ids."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not _wants_grad(hidden, weight):
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens, log_tail_size)
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, log_tail_size)


def _liger_loss_class() -> Any:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise UserError(f"loss implementation 'liger' (--loss_impl liger) needs liger-kernel with triton: "
                        f"pip install 'gptoss[gpu]' ({type(e).__name__}: {e})") from None
    return LigerFusedLinearCrossEntropyLoss


def with_tail_columns(hidden: torch.Tensor, weight: torch.Tensor, log_tail_size: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight with 8 more columns, so that hidden' @ weight'.T is hidden @ weight.T plus ln N on the tail
    row: ln N split into three parts exact in the weight's dtype, against three columns of ones (8 keeps GEMM
    shapes aligned).

    Why not liger's bias vector: liger adds it to logits already rounded to bf16, so ln N (about 12) itself is
    rounded to bf16, by up to 2^-5, the same for every token: a tail of another size. Here the GEMM's fp32
    accumulator sums the parts (within 2^-21 of ln N) before the one rounding of each logit. Gradients flow back
    through the concatenation to hidden and weight; the constant columns take none."""
    parts, rest = [], log_tail_size
    for _ in range(3):
        parts.append(torch.tensor(rest, dtype=weight.dtype))
        rest -= parts[-1].double().item()
    ones = hidden.new_zeros(hidden.shape[0], 8)
    ones[:, :3] = 1
    tail = weight.new_zeros(weight.shape[0], 8)
    tail[-1, :3] = torch.stack(parts).to(weight.device)
    return torch.cat([hidden, ones], dim=1), torch.cat([weight, tail], dim=1)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int | None = None, log_tail_size: float | None = None) -> torch.Tensor:
    """`fused_linear_cross_entropy` through liger-kernel (CUDA only; liger picks its own chunks, so
    `chunk_tokens` only applies to the no-grad walk). The tail's ln N enters through `with_tail_columns`; the
    ln N added per tail target is exact (fp32)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not _wants_grad(hidden, weight):
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens, log_tail_size)
    cls = _liger_loss_class()
    if hidden.device.type != "cuda":
        raise UserError(f"loss implementation 'liger' (--loss_impl liger) runs on CUDA only, got tensors on "
                        f"{hidden.device.type}; use fused or auto")
    params = inspect.signature(cls).parameters
    if "reduction" not in params:  # the first releases always took the mean
        raise UserError("--loss_impl liger: this liger-kernel has no reduction argument; pip install 'gptoss[gpu]'")
    kw: dict[str, Any] = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if "accum_dtype" in params:  # grad_weight summed in fp32 (liger's default: in the weight's dtype)
        kw["accum_dtype"] = torch.float32
    rows = weight.shape[0]
    if log_tail_size is not None:
        hidden, weight = with_tail_columns(hidden, weight, log_tail_size)
    total = cls(**kw)(weight, hidden.contiguous(), targets.contiguous()).float()
    if log_tail_size is not None:
        total = total + log_tail_size * (targets == rows - 1).sum()
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
