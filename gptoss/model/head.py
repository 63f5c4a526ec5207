"""The vocabulary side of both models: token ids -> embedding rows, and the head's logits and loss.

With a data vocabulary (a config with `kept_ids`, sorted full ids S) the model has |S| + 1 rows: one per kept
id, then one shared tail row for the N = vocab_size - |S| other ids; between them up to 63 pad rows bring the
weights to `cfg.embedding_rows`, a multiple of 64 (aligned logits rows in the head's matmuls). Pad rows are never
looked up, their logits never reach a softmax (-inf in the loss kernels, dropped from `logits`), so their gradient
is exactly zero; they start at zero and stay there (AdamW's decay of 0 is 0), and an export leaves them out.
The tail stays the last row, where the loss kernels expect it. Ids outside S share the tail row as input;
as output the tail enters the softmax once, as `w_tail . h + ln N`. That is exactly the full-vocabulary model
whose N unused output rows all equal `w_tail` (each gets probability p_tail / N), so losses, logits and samples
are full-vocabulary ones, and an export (`gptoss.export.vocab`) is a standard vocab_size-row model. Without
one, the head is the identity on ids. The head holds no parameters: state dicts keep `embed_tokens.weight`,
`wte.weight` and `lm_head.weight` where they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptoss.config import ModelConfig
from gptoss.model.kernels.head_loss import IGNORE_INDEX, loss_kernel

# State-dict keys holding one row per token id (GPT-OSS, GPT-2).
VOCAB_KEYS = ("embed_tokens.weight", "lm_head.weight", "wte.weight")


class VocabHead(nn.Module):
    """Full id -> row (the compact lookup of a data vocabulary), rows' logits -> full-vocabulary logits, and the
    mean cross-entropy of full-id targets through the loss kernel chosen at build time."""

    def __init__(self, cfg: ModelConfig, loss_impl: str = "auto") -> None:
        super().__init__()
        self.loss_impl = loss_impl
        self.log_tail_size: float | None = None
        self.pad_rows = cfg.embedding_rows - cfg.trained_vocab_size
        compact = kept = None
        if cfg.kept_ids is not None:  # built on the CPU even under a meta device context (adopted state dicts)
            kept = torch.tensor(cfg.kept_ids, dtype=torch.long, device="cpu")
            compact = torch.full((cfg.vocab_size,), cfg.embedding_rows - 1, dtype=torch.long, device="cpu")
            compact[kept] = torch.arange(len(cfg.kept_ids), device="cpu")  # the tail row's index for the rest
            self.log_tail_size = math.log(cfg.vocab_size - len(cfg.kept_ids))  # ln N
        self.register_buffer("compact", compact, persistent=False)  # follows from the config: not saved
        self.register_buffer("kept", kept, persistent=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.compact is None else self.compact[ids]

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(..., vocab_size): kept ids their own logit, every other id the tail logit itself (not plus ln N: the
        N equal logits together carry it), so softmax, argmax and sampling are those of the exported model; pad
        rows' logits are dropped."""
        logits = F.linear(x, weight)
        if self.kept is None:
            return logits
        full = logits[..., -1:].expand(*logits.shape[:-1], self.compact.numel()).contiguous()
        return full.index_copy_(-1, self.kept, logits[..., :self.kept.numel()].contiguous())

    def loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of full-id targets (IGNORE_INDEX skipped), logits never all materialised."""
        if self.compact is not None:
            targets = torch.where(targets == IGNORE_INDEX, targets, self.compact[targets.clamp(min=0)])
        return loss_kernel(self.loss_impl, x.device)(x, weight, targets, None, self.log_tail_size, self.pad_rows)

    @torch.no_grad()
    def reset_rows(self, embedding: torch.Tensor, unembedding: torch.Tensor) -> None:
        """After the random init: zero the pad rows of both weights (tied: one tensor), and the output tail row:
        it stands for N unused rows whose independent inits average to ~0 in what they feed back to the hidden
        state. A random tail row pushes one fixed direction into every hidden gradient while the tail holds most
        of the probability; measured (BENCHMARKS 7) that made tiny learn 0.5 nats per token worse than --vocab
        full after 200 steps."""
        if self.kept is None:
            return
        for weight in (embedding, unembedding):
            weight[self.kept.numel():-1].zero_()
        unembedding[-1].zero_()
