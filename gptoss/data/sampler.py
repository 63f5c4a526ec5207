"""Which windows a training step reads: `BatchSampler` for training, `eval_batches` for a fixed validation set.

Both are pure functions of their arguments (seed, step, rank, world_size; or the batch count), so ranks see
different data and a resumed run continues the identical stream; the windows come from a `TokenDataset`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from gptoss.data.dataset import TokenDataset
from gptoss.data.layout import DataError

log = logging.getLogger(__name__)


class BatchSampler:
    """Random windows whose starts are a pure function of (seed, step, rank, world_size).

    No hidden RNG state: step `s` on rank `r` always draws the same batch, so ranks differ from each other
    and a run resumed from `state_dict()` continues the identical stream.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside [0, world_size={world_size})")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def starts(self, step: int) -> np.ndarray:
        """Window starts of batch `step` on this rank."""
        rng = np.random.default_rng([self.seed, self.world_size, self.rank, step])
        return rng.integers(0, len(self.dataset), size=self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [batch_size, seq_len]; advances `step`."""
        batch = self.dataset.batch(self.starts(self.step))
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.dataset.seq_len}

    def load_state_dict(self, state: dict[str, int], strict: bool = True) -> None:
        """Resume at `state['step']` with its seed. This sampler keeps its own rank, so every rank may load
        the state saved by rank 0. A different world_size, batch_size or seq_len cannot continue the same
        stream: an error when `strict`, else the step and seed are taken and the stream changes from here.
        """
        saved = {k: state[k] for k in ("world_size", "batch_size", "seq_len") if k in state}
        current = {k: v for k, v in self.state_dict().items() if k in saved}
        if saved != current:
            if strict:
                raise DataError(
                    f"sampler state was saved with {saved}, this run has {current}: the batch stream cannot "
                    "continue identically (load_state_dict(state, strict=False) accepts the change)"
                )
            log.warning("sampler resumed with %s instead of %s: a different batch stream", current, saved)
        if state["seed"] != self.seed:
            log.info("sampler resumes with the checkpoint's seed %d (not %d)", state["seed"], self.seed)
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(dataset: TokenDataset, batch_size: int, num_batches: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows (identical on every call) for a comparable validation loss.

    With world_size > 1, rank r takes batches r, r + world_size, ...: together the ranks cover the same set.
    """
    n = batch_size * num_batches
    starts = np.linspace(0, len(dataset) - 1, n).round().astype(np.int64).reshape(num_batches, batch_size)
    for i in range(rank, num_batches, world_size):
        yield dataset.batch(starts[i])
