"""The head's cross-entropy over a 201k vocabulary without materialising all fp32 logits: one table
`LOSS_KERNELS` of name -> `fn(hidden, weight, targets, chunk_tokens, log_tail_size) -> mean loss`.

- chunked: checkpointed chunks, logits recomputed in backward; the CPU default (BENCHMARKS 11 measures it).
- fused: each chunk's logits made once and turned at once into both gradients; 1.48x faster than chunked at
  the full vocabulary in 0.69x the memory (BENCHMARKS 11), the CUDA default.
- liger: liger-kernel's Triton kernel (CUDA only, `pip install 'gptoss[gpu]'`), timed by bench/gpu_check.py.

`log_tail_size` = ln N: the last row of `weight` is the data vocabulary's shared tail of N ids
(`gptoss.model.head`); its logit + ln N is their total mass, and a target among them has log-probability
log p_tail - ln N. Without gradients wanted every kernel is the chunked loss-only walk, so validation numbers
never depend on the training kernel.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptoss.errors import UserError

IGNORE_INDEX = -100


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: at most 2^28 logits (1 GiB of fp32), at least 256 tokens."""
    return max(256, (1 << 28) // vocab)


def _wants_grad(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _count(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, log_tail_size: float | None) -> torch.Tensor:
    """fp32 logits of one chunk, the tail row raised by ln N (the matmul in the input dtype)."""
    logits = F.linear(hidden, weight).float()
    if log_tail_size is not None:
        logits[:, -1] += log_tail_size  # in place: no second vocab-sized tensor
    return logits


def _tail_term(targets: torch.Tensor, rows: int, log_tail_size: float | None) -> torch.Tensor | float:
    """ln N for each target on the tail row (one of its N ids)."""
    return 0.0 if log_tail_size is None else log_tail_size * (targets == rows - 1).sum()


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    log_tail_size: float | None) -> torch.Tensor:
    ce = F.cross_entropy(_logits(hidden, weight, log_tail_size), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce + _tail_term(targets, weight.shape[0], log_tail_size)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int | None = None, log_tail_size: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T`, chunk by chunk. With more than one chunk each runs under
    activation checkpointing, so forward and backward hold one chunk's logits; a single chunk skips it (it
    would only run the matmul twice)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    recompute = hidden.shape[0] > chunk_tokens and _wants_grad(hidden, weight)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start:start + chunk_tokens], weight, targets[start:start + chunk_tokens], log_tail_size)
        total = total + (checkpoint(_chunk_loss_sum, *args, use_reentrant=False) if recompute
                         else _chunk_loss_sum(*args))
    return total / _count(targets)


def _chunk_loss_and_logit_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               log_tail_size: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the chunk in fp32, d loss_sum / d logits in the input dtype): softmax - onehot, zero on
    ignored rows."""
    logits = _logits(hidden, weight, log_tail_size)
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
                log_tail_size: float | None) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = hidden.new_empty(hidden.shape) if want_hidden else None  # contiguous: rows are out= views
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
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
        return dh, dw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int | None = None, log_tail_size: float | None = None) -> torch.Tensor:
    """`chunked_cross_entropy`'s value and gradients without recomputing the logits in backward."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not _wants_grad(hidden, weight):
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens, log_tail_size)
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, log_tail_size)


def liger_available() -> bool:
    """Whether liger-kernel is installed (found, not imported: importing it needs triton)."""
    return importlib.util.find_spec("liger_kernel") is not None


def with_tail_columns(hidden: torch.Tensor, weight: torch.Tensor, log_tail_size: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight with 8 more columns, so that hidden' @ weight'.T adds ln N to the tail row only: ln N
    split into three parts exact in the weight's dtype, against three columns of ones (8 keeps GEMM shapes
    aligned). Liger's bias vector would be added to logits already rounded to bf16, rounding ln N itself by
    up to 2^-5 for every token (a tail of another size); here the GEMM's fp32 accumulator sums the parts."""
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
    """The fused contract through liger-kernel (CUDA only; liger picks its own chunks)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not _wants_grad(hidden, weight):
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens, log_tail_size)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss as cls
    except ImportError as e:
        raise UserError(f"--loss_impl liger needs liger-kernel with triton: pip install 'gptoss[gpu]' "
                        f"({type(e).__name__}: {e})") from None
    if hidden.device.type != "cuda":
        raise UserError(f"--loss_impl liger runs on CUDA only, got tensors on {hidden.device.type}; use fused or auto")
    params = inspect.signature(cls).parameters
    if "reduction" not in params:
        raise UserError("--loss_impl liger: this liger-kernel has no reduction argument; pip install 'gptoss[gpu]'")
    kw: dict[str, Any] = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if "accum_dtype" in params:  # grad_weight summed in fp32 (liger's default: in the weight's dtype)
        kw["accum_dtype"] = torch.float32
    rows = weight.shape[0]
    if log_tail_size is not None:
        hidden, weight = with_tail_columns(hidden, weight, log_tail_size)
    total = cls(**kw)(weight, hidden.contiguous(), targets.contiguous()).float()
    return (total + _tail_term(targets, rows, log_tail_size)) / _count(targets)


LossKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int | None, float | None], torch.Tensor]
LOSS_KERNELS: dict[str, LossKernel] = {
    "chunked": chunked_cross_entropy,
    "fused": fused_linear_cross_entropy,
    "liger": liger_linear_cross_entropy,
}
LOSS_IMPLS = ("auto", *LOSS_KERNELS)


def check_loss_impl(impl: str, flag: str = "--loss_impl") -> None:
    """A clear UserError for an unknown name, or for liger without liger-kernel installed."""
    if impl not in LOSS_IMPLS:
        raise UserError(f"{flag}={impl}: expected one of {', '.join(LOSS_IMPLS)}")
    if impl == "liger" and not liger_available():
        raise UserError(f"{flag}=liger needs liger-kernel, which is not installed: pip install 'gptoss[gpu]' "
                        "(an offline GPU machine: scripts/gpu_wheels.sh packs its wheel; install it with --no-deps)")


def loss_kernel(impl: str, device: torch.device) -> LossKernel:
    """The kernel `impl` runs on `device`: auto is fused on CUDA, chunked elsewhere."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "chunked"
    check_loss_impl(impl)
    return LOSS_KERNELS[impl]
