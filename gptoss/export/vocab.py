"""A data-vocabulary model written as the full-vocabulary model it equals (`gptoss.model.head`): each id outside
the kept set gets the tail row in the unembedding and the shared row in the embedding; the pad rows between the
kept rows and the tail are left out."""

from __future__ import annotations

import torch

from gptoss.config import ModelConfig
from gptoss.model.head import VOCAB_KEYS


def expand_rows(rows: torch.Tensor, kept_ids: list[int], vocab_size: int) -> torch.Tensor:
    """(embedding_rows, h) compact rows (|S| kept, pad, tail) -> (vocab_size, h): the tail row for every id
    outside S."""
    full = rows[-1:].expand(vocab_size, rows.shape[1]).clone()
    full[torch.tensor(kept_ids, dtype=torch.long)] = rows[:len(kept_ids)]
    return full


def expand_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A (piece of a) state dict of a data-vocabulary model -> that of `cfg.exported()`; unchanged without one."""
    if cfg.kept_ids is None:
        return state
    return {k: expand_rows(v, cfg.kept_ids, cfg.vocab_size) if k in VOCAB_KEYS else v for k, v in state.items()}
