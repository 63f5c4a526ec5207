"""Finding and reading a text source: a Hugging Face hub name, or local .txt/.jsonl/.json/.parquet files
(one file, a directory or a glob), as `datasets` splits with a text column.

Nothing here tokenizes or writes: `prepare` turns what this returns into token files. A local source's
validation split comes from file names (valid/validation/val/dev; test files are skipped), a hub dataset's
from its split names; without one, `holdout` draws a seeded random share of the training documents.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptoss.data.layout import DataError

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "roneneldan/TinyStories"
DOC_SEPARATOR = "<|endoftext|>"  # the line between stories in TinyStories .txt files
FORMATS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")
_VAL_FILE = re.compile(rf"(^|[-_. ])({'|'.join(VAL_SPLIT_NAMES)})([-_. ]|$)", re.IGNORECASE)
_TEST_FILE = re.compile(r"(^|[-_. ])test([-_. ]|$)", re.IGNORECASE)


def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":  # datasets' json builder and our txt reader both decompress
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _is_local(source: str) -> bool:
    """Hub names look like `owner/name`; anything path-like is treated as local so typos fail clearly."""
    return (
        Path(source).expanduser().exists()
        or any(c in source for c in "*?[")
        or source.startswith((".", "/", "~"))
        or _file_format(Path(source)) is not None
    )


def _resolve_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and _file_format(f))
        if not files:
            raise DataError(f"no .txt/.jsonl/.json/.parquet files in directory {path}")
    elif any(c in source for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"no files match {source}")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"source file not found: {path}")
    for f in files:
        if _file_format(f) is None:
            raise DataError(f"unsupported file type: {f} (use .txt, .jsonl, .json or .parquet)")
    if len({_file_format(f) for f in files}) > 1:
        raise DataError(f"{source} mixes file types; use one of .txt, .jsonl/.json, .parquet")
    return [f.resolve() for f in files]


def resolve_source(source: str) -> tuple[dict[str, list[Path]] | None, str]:
    """(files per split, or None for a hub dataset; a description for meta.json and logs). Reads nothing."""
    if not _is_local(source):
        return None, f"hub:{source}"
    files = _split_files(_resolve_files(source))
    return files, "; ".join(f"{split}: {', '.join(map(str, paths))}" for split, paths in files.items())


def _split_files(files: list[Path]) -> dict[str, list[Path]]:
    """Names with valid/validation/val/dev form the validation split; test files are skipped."""
    if len(files) == 1:
        return {"train": files}
    split: dict[str, list[Path]] = {"train": [], "val": []}
    for f in files:
        if _VAL_FILE.search(f.name):
            split["val"].append(f)
        elif _TEST_FILE.search(f.name):
            log.info("skipping test file %s", f)
        else:
            split["train"].append(f)
    if not split["train"]:
        raise DataError(f"no training files among {[str(f) for f in files]} (all look like val/test files)")
    return {k: v for k, v in split.items() if v}


def read_txt_stories(path: str | Path) -> Iterator[str]:
    """Stream the non-empty stories of a .txt (or .txt.gz) between `<|endoftext|>` lines, stripped; needs no
    `datasets` (bench/gpu_check.py reads its TinyStories copy with it)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines: list[str] = []
        for line in itertools.chain(f, [DOC_SEPARATOR]):  # a final separator closes the last story
            if line.strip() != DOC_SEPARATOR:
                lines.append(line)
                continue
            doc, lines = "".join(lines).strip(), []
            if doc:
                yield doc


def _txt_documents(files: list[tuple[str, int, int]], text_column: str) -> Iterator[dict[str, str]]:
    """`read_txt_stories` of each file as `datasets` rows.

    Size and mtime ride along in `files` only so that datasets' cache key changes when a file does.
    """
    for name, _size, _mtime in files:
        for doc in read_txt_stories(name):
            yield {text_column: doc}


def load_files(files: dict[str, list[Path]], text_column: str) -> dict[str, Any]:
    import datasets

    fmt = _file_format(next(iter(files.values()))[0])
    out = {}
    for split, paths in files.items():
        try:
            if fmt == "txt":
                stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
                out[split] = datasets.Dataset.from_generator(
                    _txt_documents,
                    features=datasets.Features({text_column: datasets.Value("string")}),
                    gen_kwargs={"files": stats, "text_column": text_column},
                )
            else:
                out[split] = datasets.load_dataset(fmt, data_files=[str(p) for p in paths], split="train")
        except Exception as e:  # datasets raises many types for unreadable files; name the files instead
            names = ", ".join(map(str, paths))
            if "corresponds to no data" in str(e):  # datasets' words for zero rows
                raise DataError(f"{names}: empty dataset (no documents)") from e
            raise DataError(f"cannot read {names}: {type(e).__name__}: {e}") from e
    return out


def load_hub(name: str, train_split: str, val_split: str | None) -> dict[str, Any]:
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown name, auth: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"cannot load '{name}' from the Hugging Face hub ({type(e).__name__}: {first}); "
            "offline, HF_HUB_OFFLINE=1 loads a copy already in the HF cache, else pass a local file, dir or glob"
        ) from e
    for split in (train_split, val_split):
        if split is not None and split not in dd:
            raise DataError(f"hub dataset '{name}' has no split '{split}'; splits: {list(dd)}")
    val = val_split or next((s for s in VAL_SPLIT_NAMES if s in dd), None)
    return {"train": dd[train_split], **({"val": dd[val]} if val is not None else {})}


def check_columns(splits: dict[str, Any], text_column: str, description: str) -> None:
    for split, ds in splits.items():
        if text_column not in ds.column_names:
            raise DataError(
                f"{description}: no text column '{text_column}' in split '{split}'; "
                f"columns: {ds.column_names} (choose one with --text_column)"
            )
        if getattr(ds.features[text_column], "dtype", None) not in ("string", "large_string"):
            raise DataError(f"{description}: column '{text_column}' holds {ds.features[text_column]}, not text")
        if ds.num_rows == 0:
            raise DataError(f"{description}: split '{split}' is empty (no documents)")


def holdout(train: Any, val_fraction: float, seed: int, description: str) -> tuple[Any, Any]:
    """Seeded random documents for validation, at least one; both splits keep the source order."""
    n = train.num_rows
    if n < 2:
        raise DataError(f"{description} has {n} document; need at least 2 to hold one out for validation")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return train.select(np.sort(perm[n_val:])), train.select(np.sort(perm[:n_val]))
