"""The on-disk format of a prepared data dir, in one place for its writer (`prepare`) and its reader (`dataset`).

    <data dir>/
        train.bin       every document's o200k ids followed by <|endoftext|>, one flat little-endian uint32 array
        val.bin         the same for the validation split
        token_counts.npz  per split, the ids it uses and how often (`<split>_ids`, `<split>_counts`): which
                        rows of the vocabulary the data needs, known without reading the token files
        meta.json       written last, so its presence marks finished output: format_version (FORMAT_VERSION;
                        anything else is refused), tokenizer, vocab_size, eot_id, dtype and per split its file,
                        token count, documents, UTF-8 bytes, distinct ids, sha256 and largest id

`write_split` and `new_meta` are the format's one writer, used by `prepare` and by `write_prepared` (ids already in
memory, no `datasets`: tests and the GPU check). `DataError`, the error every part of `gptoss.data` raises, lives here
too: it is the one module they all share.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gptoss.config import ConfigError, read_json_object
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
        meta = read_json_object(path)
    except ConfigError as e:
        raise DataError(str(e)) from e
    if (found := meta.get("format_version")) != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {found}, this gptoss reads format_version {FORMAT_VERSION}; "
                        "re-run prepare_data.py --force")
    return meta


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


def read_token_counts(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) of a split from token_counts.npz."""
    path = data_dir / TOKEN_COUNTS_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} is incomplete; re-run prepare_data.py --force")
    with np.load(path) as z:
        if f"{split}_ids" not in z:
            raise DataError(f"{path} has no counts for split '{split}'; re-run prepare_data.py --force")
        return z[f"{split}_ids"].astype(np.int64), z[f"{split}_counts"]


def write_split(path: Path, chunks: Iterable[np.ndarray], vocab_size: int) -> tuple[dict[str, Any], np.ndarray]:
    """Stream uint32 ids into `path`; returns the split's meta entry (tokens, sha256, largest id, distinct ids)
    and its count per id, all found while writing. The largest id lets training refuse ids outside the model's
    vocabulary without reading the file; the counts tell which ids the split uses."""
    sha, written, top = hashlib.sha256(), 0, -1
    counts = np.zeros(vocab_size, dtype=np.int64)
    with open(path, "wb") as f:
        for chunk in chunks:
            arr = np.ascontiguousarray(chunk, dtype=DTYPE)
            f.write(memoryview(arr))
            sha.update(memoryview(arr))
            written += arr.size
            top = max(top, int(arr.max())) if arr.size else top
            counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
    info = {"tokens": written, "sha256": sha.hexdigest(), "max_token_id": top,
            "distinct_ids": int(np.count_nonzero(counts))}
    return info, counts


def new_meta(*, tokenizer: str, vocab_size: int, eot_id: int, source: str, splits: dict[str, Any],
             **extra: Any) -> dict[str, Any]:
    """meta.json's content: the format version and layout, then whatever the writer adds (settings, timings)."""
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot_id,
            "dtype": "uint32", "source": source, "splits": splits, "token_counts": TOKEN_COUNTS_NAME, **extra}


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    """meta.json, last and atomically: its presence marks the dir finished."""
    tmp = out / f"{META_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_NAME)


def write_prepared(out: Path, arrays: dict[str, np.ndarray], *, tokenizer: str, vocab_size: int, eot_id: int,
                   source: str, utf8_bytes: dict[str, int] | None = None) -> dict[str, Any]:
    """A prepared dir from ids in memory, without `datasets`: each split's documents are its <|endoftext|> ids
    (every document ends with one), its UTF-8 bytes as given (text tokenizers only)."""
    out.mkdir(parents=True, exist_ok=True)
    splits, counts = {}, {}
    for split, ids in arrays.items():
        info, counts[split] = write_split(out / f"{split}.bin", [ids], vocab_size)
        splits[split] = {"file": f"{split}.bin", **info, "documents": int(np.count_nonzero(np.asarray(ids) == eot_id))}
        if utf8_bytes is not None:
            splits[split]["bytes"] = utf8_bytes[split]
    write_token_counts(out / TOKEN_COUNTS_NAME, counts)
    meta = new_meta(tokenizer=tokenizer, vocab_size=vocab_size, eot_id=eot_id, source=source, splits=splits)
    write_meta(out, meta)
    return meta
