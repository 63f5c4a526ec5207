"""The on-disk format of a prepared data dir, in one place for its writer (`prepare`) and its reader (`dataset`).

    <data dir>/
        train.bin       every document's o200k ids followed by <|endoftext|>, one flat little-endian uint32 array
        val.bin         the same for the validation split
        meta.json       written last, so its presence marks finished output: tokenizer, vocab_size, dtype and
                        per split its file, token count, sha256 and largest id

`DataError`, the error every part of `gptoss.data` raises, lives here too: it is the one module they all share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gptoss.errors import UserError

META_NAME = "meta.json"
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
