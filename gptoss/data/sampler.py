"""Which windows a training step reads: `BatchSampler` for training, `eval_batches` for a fixed validation set.

Both are pure functions of their arguments (seed and step; or the batch count), so a resumed run continues the
identical stream; the windows come from a `TokenDataset`. The split is cut into non-overlapping windows of
seq_len + 1 tokens at starts 0, L, 2L, ... (L = seq_len; their targets tile tokens 1 .. n*L), and each epoch visits
every window once in a seeded permutation, re-shuffled each epoch: a one-epoch token budget sees every token (bar a
tail shorter than one window). The trainer draws one global batch per step and each rank takes its rows of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from gptoss.data.dataset import TokenDataset
from gptoss.data.layout import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # a target that counts in no loss (torch's cross_entropy default); the model's loss reads it


class BatchSampler:
    """Windows whose starts are a pure function of (seed, step): no hidden RNG state, so step `s` always draws
    the same batch and a run resumed from `state_dict()` continues the identical stream."""

    def __init__(self, dataset: TokenDataset, batch_size: int, *, seed: int) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.step = 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation): the one in use

    def starts(self, step: int) -> np.ndarray:
        """Window starts of batch `step`."""
        n = self.dataset.num_windows
        first = step * self.batch_size  # position in the endless epoch stream
        pos = np.arange(first, first + self.batch_size, dtype=np.int64)
        windows = np.empty_like(pos)
        for epoch in np.unique(pos // n):  # a batch may straddle two epochs
            here = pos // n == epoch
            windows[here] = self._permutation(int(epoch))[pos[here] % n]
        return windows * self.dataset.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.dataset.num_windows))
        return self._perm[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [batch_size, seq_len]; advances `step`."""
        batch = self.dataset.batch(self.starts(self.step))
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size, "seq_len": self.dataset.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state['step']` with its seed; another batch_size or seq_len cannot continue the same stream."""
        saved = {k: state[k] for k in ("batch_size", "seq_len")}
        current = {k: v for k, v in self.state_dict().items() if k in saved}
        if saved != current:
            raise DataError(f"sampler state was saved with {saved}, this run has {current}: the batch stream cannot "
                            "continue identically")
        if state["seed"] != self.seed:
            log.info("sampler resumes with the checkpoint's seed %d (not %d)", state["seed"], self.seed)
        self.seed, self.step, self._perm = int(state["seed"]), int(state["step"]), None


def eval_batches(dataset: TokenDataset, batch_size: int, num_batches: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows (identical on every call) for a comparable validation loss.

    With world_size > 1, rank r takes batches r, r + world_size, ...: together the ranks cover the same set.
    """
    n = batch_size * num_batches
    starts = np.linspace(0, len(dataset) - 1, n).round().astype(np.int64).reshape(num_batches, batch_size)
    for i in range(rank, num_batches, world_size):
        yield dataset.batch(starts[i])


def whole_split_batches(dataset: TokenDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every target of the split once: the non-overlapping windows of the "epoch" order, in file order.

    Every rank yields the same number of batches (expert parallelism needs equal forwards): rows past the
    last window, and whole batches that only even out the ranks, repeat window 0 with every target set to
    IGNORE_INDEX, so they count in no loss.
    """
    n = dataset.num_windows
    n_batches = -(-n // batch_size)
    n_batches = -(-n_batches // world_size) * world_size
    for i in range(rank, n_batches, world_size):
        windows = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int64)
        pad = windows >= n
        x, y = dataset.batch(np.where(pad, 0, windows) * dataset.seq_len)
        y[torch.from_numpy(pad)] = IGNORE_INDEX
        yield x, y
