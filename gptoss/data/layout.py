"""The on-disk format of a prepared data dir, in one place for its writer (`prepare`) and its reader (`dataset`).

    <data dir>/
        train.bin       every document's o200k ids followed by <|endoftext|>, one flat little-endian uint32 array
        val.bin         the same for the validation split
        token_counts.npz  per split, the ids it uses and how often (`<split>_ids`, `<split>_counts`): which
                        rows of the vocabulary the data needs, known without reading the token files
        meta.json       written last, so its presence marks finished output: tokenizer, vocab_size, dtype and
                        per split its file, token count, UTF-8 bytes, distinct ids, sha256 and largest id

`DataError`, the error every part of `gptoss.data` raises, lives here too: it is the one module they all share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gptoss.errors import UserError

META_NAME = "meta.json"
TOKEN_COUNTS_NAME = "token_counts.npz"
FORMAT_VERSION = 1
DTYPE = np.dtype("<u4")  # o200k ids need more than 16 bits; explicit little-endian so files travel


class DataError(UserError):
    """Input data or a prepared data dir is unusable; the message names the file and the problem."""


def read_meta(data_dir: Path) -> dict[str, Any]:
    path = data_dir / META_NAME
    if not path.is_file():
        raise DataError(
            f"{path} not found: {data_dir} is not a prepared data dir, or its preparation was interrupted "
            "(run launch/prepare_data.py)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e


def is_finished(out: Path) -> bool:
    """A meta.json whose every split file has the size it records: output that a later run may keep."""
    try:
        meta = read_meta(out)
        return all(
            (out / info["file"]).stat().st_size == info["tokens"] * DTYPE.itemsize
            for info in meta["splits"].values()
        )
    except (DataError, OSError, KeyError, TypeError):
        return False


def write_token_counts(path: Path, counts: dict[str, np.ndarray]) -> None:
    """Per split, the ids with a nonzero count and their counts (a few thousand ids for TinyStories, not 201k)."""
    arrays = {}
    for split, c in counts.items():
        ids = np.flatnonzero(c)
        arrays[f"{split}_ids"], arrays[f"{split}_counts"] = ids.astype(np.uint32), c[ids].astype(np.int64)
    with path.open("wb") as f:  # a file object: np.savez would append .npz to a temporary name
        np.savez(f, **arrays)


def read_token_counts(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, counts) of a split from token_counts.npz, or None where the dir was prepared before it existed."""
    path = data_dir / TOKEN_COUNTS_NAME
    if not path.is_file():
        return None
    with np.load(path) as z:
        if f"{split}_ids" not in z:
            raise DataError(f"{path} has no counts for split '{split}'; re-run prepare_data.py --force")
        return z[f"{split}_ids"].astype(np.int64), z[f"{split}_counts"]
