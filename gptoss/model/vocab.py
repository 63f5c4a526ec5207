"""The data vocabulary: embedding and unembedding rows only for the ids a data set uses, exactly.

A config with `kept_ids` (sorted full ids S) gives the model |S| + 1 rows: one per kept id, then one shared
tail row for the N = vocab_size - |S| other ids. Ids outside S share the tail row as input; as output the
tail enters the softmax once, as `w_tail . h + ln N`. That is exactly the full-vocabulary model whose N unused
output rows all equal `w_tail` (each gets probability p_tail / N), so losses and perplexities are
full-vocabulary quantities, and an export (`expand_state_dict`) is a standard vocab_size-row model. Kept
separate from the model classes because both GPT-OSS and the GPT-2 baseline use it, and so do export and
the trainer (`kept_set`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptoss.config import ModelConfig
from gptoss.model.loss import IGNORE_INDEX

# State-dict keys holding one row per token id (GPT-OSS, GPT-2).
VOCAB_KEYS = ("embed_tokens.weight", "lm_head.weight", "wte.weight")


class DataVocab(nn.Module):
    """Full id -> compact row (a lookup table), and compact logits -> full-vocabulary logits.

    Its buffers are not persistent (they follow from the config), so state dicts hold only the |S| + 1 rows;
    they are built on the CPU even under a meta device context, so a model adopted from a state dict works.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.kept_ids is not None
        kept = torch.tensor(cfg.kept_ids, dtype=torch.long, device="cpu")
        self.tail = len(cfg.kept_ids)  # the compact index of the tail row
        self.log_tail_size = math.log(cfg.vocab_size - len(cfg.kept_ids))  # ln N
        table = torch.full((cfg.vocab_size,), self.tail, dtype=torch.long, device="cpu")
        table[kept] = torch.arange(len(cfg.kept_ids), device="cpu")
        self.register_buffer("compact", table, persistent=False)
        self.register_buffer("kept", kept, persistent=False)

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.compact[ids]

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Compact targets; IGNORE_INDEX stays."""
        return torch.where(targets == IGNORE_INDEX, targets, self.compact[targets.clamp(min=0)])

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., |S| + 1) -> (..., vocab_size): kept ids their own logit, every other id the tail logit itself
        (not plus ln N: the N equal logits together carry the tail's ln N), so softmax, argmax and sampling
        over the result are those of the exported full-vocabulary model."""
        full = logits[..., self.tail:].expand(*logits.shape[:-1], self.compact.shape[0]).contiguous()
        return full.index_copy_(-1, self.kept, logits[..., :self.tail].contiguous())


@torch.no_grad()
def init_tail_row(weight: torch.Tensor) -> None:
    """Zero the output tail row after the random init: it stands for the N unused rows of the full-vocabulary
    model, whose independent random inits average to ~0 (std / sqrt(N)) in what they feed back to the hidden
    state. A random tail row instead pushes one fixed random direction into every hidden state's gradient while
    the tail holds most of the probability (~96% at init); measured on the real subset (BENCHMARKS 7) that made
    tiny learn 0.5 nats per token worse than --vocab full after 200 steps, and zeroed it learns like it."""
    weight[-1].zero_()


def expand_rows(rows: torch.Tensor, kept_ids: list[int], vocab_size: int) -> torch.Tensor:
    """(|S| + 1, h) compact rows -> (vocab_size, h): the tail row for every id outside S."""
    full = rows[-1:].expand(vocab_size, rows.shape[1]).clone()
    full[torch.tensor(kept_ids, dtype=torch.long)] = rows[:-1]
    return full


def expand_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A (piece of a) state dict of a data-vocabulary model -> that of `cfg.exported()`; unchanged without one."""
    if cfg.kept_ids is None:
        return state
    return {k: expand_rows(v, cfg.kept_ids, cfg.vocab_size) if k in VOCAB_KEYS else v for k, v in state.items()}
