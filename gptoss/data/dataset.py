"""`TokenDataset`: one split of a prepared data dir, memory-mapped, as the training windows read it.

Opening checks the split against meta.json (dtype, vocabulary, file size, largest id) without reading the
file; every batch is checked for out-of-vocabulary ids in one max; `check_token_range` and `verify_checksum`
scan the whole file on request (train.py --verify_data).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptoss.data.layout import DTYPE, META_NAME, DataError, read_meta
from gptoss.tokenizer import ENCODING_NAME, VOCAB_SIZE, token_byte_lengths

_CHUNK_TOKENS = 1 << 24  # 64 MiB reads when scanning a split


class TokenDataset:
    """One split of a prepared data dir, memory-mapped read-only (never loaded into RAM).

    A window is seq_len + 1 consecutive tokens starting anywhere (documents are not aligned): inputs are
    the first seq_len, targets the last seq_len.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, seq_len: int,
                 vocab_size: int | None = None) -> None:
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, int(seq_len)
        self.meta = read_meta(self.data_dir)
        meta_path = self.data_dir / META_NAME  # its format_version fixes the dtype; train.py checks seq_len >= 1
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{meta_path} has no split '{split}'; splits: {list(splits)}")
        try:
            info = splits[split]
            self.path = self.data_dir / info["file"]
            self.vocab_size, self.eot_id = int(self.meta["vocab_size"]), int(self.meta["eot_id"])
            self.num_tokens, top, self.sha256 = int(info["tokens"]), int(info["max_token_id"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{meta_path}: split '{split}' or the vocabulary malformed ({type(e).__name__}: {e}); "
                            "re-run prepare_data.py --force") from e
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise DataError(
                f"{self.data_dir} was tokenized with vocab_size {self.vocab_size} "
                f"({self.meta.get('tokenizer')}), but the model's vocab_size is {vocab_size}"
            )
        if top >= self.vocab_size:
            raise DataError(
                f"{meta_path}: split '{split}' holds token ids up to {top} (max_token_id), outside the vocabulary "
                f"of {self.vocab_size}: tokenized with another tokenizer or corrupted; re-run prepare_data.py --force"
            )
        if not 0 <= self.eot_id < self.vocab_size:
            raise DataError(f"{meta_path}: eot_id {self.eot_id} is not an id of the vocabulary ({self.vocab_size})")
        expected = self.num_tokens * DTYPE.itemsize
        if not self.path.is_file():
            raise DataError(f"{self.path} not found (listed in {META_NAME})")
        actual = self.path.stat().st_size
        if actual != expected:
            partial = ", not a whole number of uint32 tokens" if actual % DTYPE.itemsize else ""
            raise DataError(
                f"{self.path} is {actual} bytes{partial}, expected {expected} ({self.num_tokens} uint32 tokens "
                f"per {META_NAME}): truncated or corrupted, re-run prepare_data.py --force"
            )
        if self.num_tokens < self.seq_len + 1:
            raise DataError(
                f"{self.path}: split '{split}' has {self.num_tokens} tokens, fewer than one window of seq_len+1 = "
                f"{self.seq_len + 1}; use a smaller seq_len or more data"
            )
        self.tokens = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(self.num_tokens,))
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        """Number of valid window starts."""
        return self.num_tokens - self.seq_len

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows of seq_len + 1 tokens at starts 0, seq_len, 2 seq_len, ... (the sampler's)."""
        return (self.num_tokens - 1) // self.seq_len

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [B, seq_len], gathered in one fancy-indexing read of the memmap."""
        starts = np.asarray(starts, dtype=np.int64)
        rows = self.tokens[starts[:, None] + self._offsets]
        self._check_ids(rows, starts)
        return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))

    def _check_ids(self, rows: np.ndarray, starts: np.ndarray) -> int:
        """The largest id of windows [len(starts), n]; one outside the vocabulary is refused: the embedding lookup
        would crash (a device-side assert on GPU) or train on garbage. One max per batch costs nothing."""
        top = int(rows.max()) if rows.size else -1
        if top >= self.vocab_size:
            row, col = np.argwhere(rows >= self.vocab_size)[0]
            raise DataError(
                f"{self.path}: token id {top} at position {int(starts[row]) + int(col)} is outside the vocabulary "
                f"of {self.vocab_size}: the file is corrupted (train.py --verify_data scans the whole file); "
                "re-run prepare_data.py --force"
            )
        return top

    def token_bytes(self) -> np.ndarray | None:
        """UTF-8 bytes per id (`gptoss.tokenizer.token_byte_lengths`) when the split was tokenized with
        o200k_harmony, for bits per byte; None for other tokenizers (the tests' synthetic ids have no text)."""
        if self.meta.get("tokenizer") != ENCODING_NAME or self.vocab_size != VOCAB_SIZE:
            return None
        return token_byte_lengths()

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(0, self.num_tokens, _CHUNK_TOKENS):
            yield i, self.tokens[i:i + _CHUNK_TOKENS]

    def check_token_range(self) -> int:
        """Scan the split; returns the largest id, raises if any id lies outside the vocabulary."""
        return max(self._check_ids(chunk[None], np.array([i])) for i, chunk in self._chunks())

    def verify_checksum(self) -> str:
        """sha256 of the file against meta.json (reads the whole file: optional, not done on open)."""
        sha = hashlib.sha256()
        for _, chunk in self._chunks():
            sha.update(memoryview(np.ascontiguousarray(chunk)))
        if (digest := sha.hexdigest()) != self.sha256:
            raise DataError(f"{self.path} has sha256 {digest}, {META_NAME} says {self.sha256}: the file changed "
                            "since it was prepared (corrupted or overwritten); re-run prepare_data.py --force")
        return digest
