"""Text → tokens on disk → batches.

`prepare_dataset` reads any Hugging Face `datasets` source (hub name, .txt/.jsonl/.json/.parquet files, a
directory or a glob), tokenizes it in parallel with o200k_harmony and writes each split as one flat uint32
file (`train.bin`, `val.bin`; every document followed by <|endoftext|>) plus `meta.json`, written last so
that its presence marks finished output. `TokenDataset` memory-maps one split and checks it against the
meta; `BatchSampler` draws random windows as a pure function of (seed, step, rank, world_size), so ranks
see different data and a resumed run continues the identical stream.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss.errors import UserError
from gptoss.tokenizer import ENCODING_NAME, EOT_ID, VOCAB_SIZE, get_encoding

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "roneneldan/TinyStories"
SAMPLE_PATH = Path(__file__).parent / "assets" / "tinystories_sample.txt"
META_NAME = "meta.json"
FORMAT_VERSION = 1
DTYPE = np.dtype("<u4")  # o200k ids need more than 16 bits; explicit little-endian so files travel
DOC_SEPARATOR = "<|endoftext|>"  # the line between stories in TinyStories .txt files
FORMATS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")
_VAL_FILE = re.compile(r"(^|[-_. ])(validation|valid|val|dev)([-_. ]|$)", re.IGNORECASE)
_TEST_FILE = re.compile(r"(^|[-_. ])test([-_. ]|$)", re.IGNORECASE)
_CHUNK_TOKENS = 1 << 24  # 64 MiB reads when scanning a split


class DataError(UserError):
    """Input data or a prepared data dir is unusable; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------
# Sources


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


def _resolve_source(source: str | None, sample: bool) -> tuple[dict[str, list[Path]] | None, str]:
    """(files per split, or None for a hub dataset; a description for meta.json and logs). Reads nothing."""
    if sample:
        return {"train": [SAMPLE_PATH]}, f"gptoss sample ({SAMPLE_PATH.name})"
    source = source or DEFAULT_SOURCE
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


def _txt_documents(files: list[tuple[str, int, int]], text_column: str) -> Iterator[dict[str, str]]:
    """Stream the non-empty stories between `<|endoftext|>` lines, stripped.

    Size and mtime ride along in `files` only so that datasets' cache key changes when a file does.
    """
    import gzip

    for name, _size, _mtime in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", encoding="utf-8") as f:
            lines: list[str] = []
            for line in itertools.chain(f, [DOC_SEPARATOR]):  # a final separator closes the last story
                if line.strip() != DOC_SEPARATOR:
                    lines.append(line)
                    continue
                doc, lines = "".join(lines).strip(), []
                if doc:
                    yield {text_column: doc}


def _load_files(files: dict[str, list[Path]], text_column: str) -> dict[str, Any]:
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


def _load_hub(name: str, train_split: str, val_split: str | None) -> dict[str, Any]:
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown name, auth: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"cannot load '{name}' from the Hugging Face hub ({type(e).__name__}: {first}); "
            "offline, HF_HUB_OFFLINE=1 loads a copy already in the HF cache, else pass a local file, dir or glob"
        ) from e
    if train_split not in dd:
        raise DataError(f"hub dataset '{name}' has no split '{train_split}'; splits: {list(dd)}")
    out = {"train": dd[train_split]}
    if val_split is not None and val_split not in dd:
        raise DataError(f"hub dataset '{name}' has no split '{val_split}'; splits: {list(dd)}")
    val = val_split or next((s for s in VAL_SPLIT_NAMES if s in dd), None)
    if val is not None:
        out["val"] = dd[val]
    return out


def _check_columns(splits: dict[str, Any], text_column: str, description: str) -> None:
    for split, ds in splits.items():
        if text_column not in ds.column_names:
            raise DataError(
                f"{description}: no text column '{text_column}' in split '{split}'; "
                f"columns: {ds.column_names} (choose one with --text_column)"
            )
        dtype = getattr(ds.features[text_column], "dtype", None)
        if dtype not in ("string", "large_string"):
            feature = ds.features[text_column]
            raise DataError(f"{description}: column '{text_column}' holds {feature}, not text")
        if ds.num_rows == 0:
            raise DataError(f"{description}: split '{split}' is empty (no documents)")


def _holdout(train: Any, val_fraction: float, seed: int, description: str) -> tuple[Any, Any]:
    """Seeded random documents for validation, at least one; both splits keep the source order."""
    n = train.num_rows
    if n < 2:
        raise DataError(f"{description} has {n} document; need at least 2 to hold one out for validation")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return train.select(np.sort(perm[n_val:])), train.select(np.sort(perm[:n_val]))


# ---------------------------------------------------------------------------------------------------------
# Tokenize and write


def _tokenize_batch(batch: dict[str, list], text_column: str) -> dict[str, list]:
    """Empty documents are dropped; every kept one ends with <|endoftext|>.

    A plain loop, not `encode_ordinary_batch`: on story-sized documents its thread pool costs more than it
    saves (measured 2x slower with 1-2 threads); parallelism comes from `map(num_proc=...)` instead.
    """
    enc = get_encoding()  # looked up here, not captured: datasets hashes the function for its cache key
    ids = [enc.encode_ordinary(t) for t in batch[text_column] if t and not t.isspace()]
    for doc in ids:
        doc.append(EOT_ID)
    return {"ids": ids, "len": [len(doc) for doc in ids]}


def _tokenize(ds: Any, split: str, text_column: str, num_proc: int | None) -> Any:
    import datasets

    if num_proc is None:  # a worker costs ~0.5 s to start: one per 20k documents, up to the cores
        num_proc = min(os.cpu_count() or 1, 16, max(1, ds.num_rows // 20_000))
    num_proc = max(1, min(num_proc, ds.num_rows))
    features = datasets.Features(
        {"ids": datasets.List(datasets.Value("uint32")), "len": datasets.Value("int64")}
    )
    get_encoding()  # load (and seed the cache) once here, so forked workers inherit it
    return ds.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        features=features,
        fn_kwargs={"text_column": text_column},
        desc=f"tokenize {split}",
    )


def _write_split(ds: Any, path: Path, split: str) -> tuple[int, str, int]:
    """Stream the tokenized split into `path`; returns (tokens, sha256, largest id), all found while writing.

    The largest id goes into meta.json so that training can refuse ids outside the model's vocabulary
    without reading the file.
    """
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    total = pc.sum(ds.with_format("arrow")["len"]).as_py()
    sha, written, top = hashlib.sha256(), 0, -1
    with open(path, "wb") as f, tqdm(total=total, unit="tok", unit_scale=True, desc=f"write {split}") as bar:
        for table in ds.with_format("arrow").iter(batch_size=10_000):
            arr = np.ascontiguousarray(pc.list_flatten(table["ids"]).to_numpy(), dtype=DTYPE)
            f.write(memoryview(arr))
            sha.update(memoryview(arr))
            written += arr.size
            top = max(top, int(arr.max())) if arr.size else top
            bar.update(arr.size)
    if written != total:
        raise DataError(f"wrote {written} tokens to {path}, expected {total}")
    return written, sha.hexdigest(), top


def _read_meta(data_dir: Path) -> dict[str, Any]:
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


def _is_finished(out: Path) -> bool:
    try:
        meta = _read_meta(out)
        return all(
            (out / info["file"]).stat().st_size == info["tokens"] * DTYPE.itemsize
            for info in meta["splits"].values()
        )
    except (DataError, OSError, KeyError, TypeError):
        return False


def prepare_dataset(
    source: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "data/tinystories",
    *,
    sample: bool = False,
    text_column: str = "text",
    num_proc: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    force: bool = False,
    train_split: str = "train",
    val_split: str | None = None,
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir/{train,val}.bin` + `meta.json`; returns the meta.

    source: hub name (default roneneldan/TinyStories), a .txt (stories separated by `<|endoftext|>` lines),
    .jsonl/.json/.parquet file with `text_column`, a directory or a glob of such files. `sample=True` uses
    the stories shipped with gptoss. The validation split is the source's own (hub: `val_split` or the
    first of validation/valid/val/dev; files: names containing valid/validation/val/dev) when there is one,
    else a seeded random `val_fraction` of the documents (at least one). Finished output with the same
    settings is left as is unless `force`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output dir {out} exists and is a file")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if num_proc is not None and num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    if sample and source is not None:
        raise DataError("pass either a source or sample=True, not both")
    source = os.fspath(source) if source is not None else None
    files, description = _resolve_source(source, sample)
    settings = {"source": description, "text_column": text_column, "val_fraction": val_fraction,
                "seed": seed, "train_split": train_split, "val_split": val_split, "tokenizer": ENCODING_NAME}

    if _is_finished(out) and not force:
        meta = _read_meta(out)
        if meta.get("settings") != settings:
            raise DataError(
                f"{out} already holds data prepared from {meta.get('source')!r} with other settings; "
                "pass force=True (--force) to overwrite it, or choose another output dir"
            )
        log.info("%s is already prepared (%s); nothing to do (force=True re-prepares)", out, meta["source"])
        return meta

    if files is not None:
        splits = _load_files(files, text_column)
    else:
        splits = _load_hub(source or DEFAULT_SOURCE, train_split, val_split)
    _check_columns(splits, text_column, description)
    if "val" in splits:
        val_from = "source validation split"
    else:
        splits["train"], splits["val"] = _holdout(splits["train"], val_fraction, seed, description)
        val_from = f"seeded holdout (val_fraction={val_fraction}, seed={seed})"

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.bin.*.tmp"), *out.glob(f"{META_NAME}.*.tmp")]:  # left by a killed run
        stale.unlink()
    tmp_bins: dict[str, Path] = {}
    meta_tmp = out / f"{META_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    stats: dict[str, dict[str, Any]] = {}
    try:
        # Old finished output stays intact until every new split is fully on disk under a temp name.
        for split, ds in splits.items():
            tokenized = _tokenize(ds, split, text_column, num_proc)
            if tokenized.num_rows == 0:
                raise DataError(f"{description}: split '{split}' has no non-empty documents")
            tmp_bins[split] = out / f"{split}.bin.{uuid.uuid4().hex[:8]}.tmp"
            tokens, digest, top = _write_split(tokenized, tmp_bins[split], split)
            stats[split] = {"file": f"{split}.bin", "tokens": tokens, "documents": tokenized.num_rows,
                            "sha256": digest, "max_token_id": top}
        seconds = time.perf_counter() - t0  # tokenize + write
        n_tokens = sum(s["tokens"] for s in stats.values())
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": ENCODING_NAME,
            "vocab_size": VOCAB_SIZE,
            "eot_id": EOT_ID,
            "dtype": "uint32",
            "source": description,
            "val_from": val_from,
            "splits": stats,
            "settings": settings,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (out / META_NAME).unlink(missing_ok=True)  # from here until the end the dir is "unfinished"
        for split, tmp in tmp_bins.items():
            os.replace(tmp, out / stats[split]["file"])
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(meta_tmp, out / META_NAME)
    finally:
        for tmp in [*tmp_bins.values(), meta_tmp]:
            tmp.unlink(missing_ok=True)
    log.info(
        "prepared %s in %.1fs (%.0f tokens/s): %s", out, seconds, meta["tokens_per_second"],
        ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in stats.items()),
    )
    return meta


# ---------------------------------------------------------------------------------------------------------
# Reading


class TokenDataset:
    """One split of a prepared data dir, memory-mapped read-only (never loaded into RAM).

    A window is seq_len + 1 consecutive tokens starting anywhere (documents are not aligned): inputs are
    the first seq_len, targets the last seq_len.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, seq_len: int,
                 vocab_size: int | None = None) -> None:
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, int(seq_len)
        self.meta = _read_meta(self.data_dir)
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        meta_path = self.data_dir / META_NAME
        if self.meta.get("dtype") != "uint32":
            raise DataError(f"{meta_path}: dtype {self.meta.get('dtype')!r}, expected 'uint32'")
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{meta_path} has no split '{split}'; splits: {list(splits)}")
        info = self.meta["splits"][split]
        self.path = self.data_dir / info["file"]
        self.vocab_size = int(self.meta["vocab_size"])
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise DataError(
                f"{self.data_dir} was tokenized with vocab_size {self.vocab_size} "
                f"({self.meta.get('tokenizer')}), but the model's vocab_size is {vocab_size}"
            )
        top = info.get("max_token_id")  # absent in data prepared before it was recorded
        if top is not None and int(top) >= self.vocab_size:
            raise DataError(
                f"{meta_path}: split '{split}' holds token ids up to {top} (max_token_id), outside the vocabulary "
                f"of {self.vocab_size}: tokenized with another tokenizer or corrupted; re-run prepare_data.py --force"
            )
        self.num_tokens = int(info["tokens"])
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
        self._open()

    def _open(self) -> None:
        self.tokens = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(self.num_tokens,))
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the file instead of copying it
        return {k: v for k, v in self.__dict__.items() if k not in ("tokens", "_offsets")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        """Number of valid window starts."""
        return self.num_tokens - self.seq_len

    def window(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [seq_len] each, from one slice of seq_len + 1 tokens."""
        if not 0 <= start < len(self):
            raise IndexError(f"window start {start} outside [0, {len(self)}) of split '{self.split}'")
        chunk = self.tokens[start:start + self.seq_len + 1]
        self._check_ids(chunk[None], np.array([start]))
        chunk = torch.from_numpy(chunk.astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [B, seq_len], gathered in one fancy-indexing read of the memmap."""
        starts = np.asarray(starts, dtype=np.int64)
        rows = self.tokens[starts[:, None] + self._offsets]
        self._check_ids(rows, starts)
        return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))

    def _check_ids(self, rows: np.ndarray, starts: np.ndarray) -> None:
        """Refuse windows [len(starts), seq_len + 1] holding an id outside the vocabulary: the embedding lookup
        would crash (a device-side assert on GPU) or train on garbage. One max per batch costs nothing."""
        top = int(rows.max()) if rows.size else -1
        if top >= self.vocab_size:
            row, col = np.argwhere(rows >= self.vocab_size)[0]
            raise DataError(
                f"{self.path}: token id {top} at position {int(starts[row]) + int(col)} is outside the vocabulary "
                f"of {self.vocab_size}: the file is corrupted (train.py --verify_data scans the whole file); "
                "re-run prepare_data.py --force"
            )

    def _chunks(self) -> Iterator[np.ndarray]:
        for i in range(0, self.num_tokens, _CHUNK_TOKENS):
            yield self.tokens[i:i + _CHUNK_TOKENS]

    def check_token_range(self, vocab_size: int | None = None) -> int:
        """Scan the split; returns the largest id, raises if any id is >= vocab_size (default: meta's)."""
        limit = self.vocab_size if vocab_size is None else vocab_size
        top = max(int(chunk.max()) for chunk in self._chunks())
        if top >= limit:
            raise DataError(f"{self.path} holds token id {top}, outside the vocabulary of {limit}: tokenized with "
                            "another tokenizer or corrupted; re-run prepare_data.py --force")
        return top

    def verify_checksum(self) -> str:
        """sha256 of the file against meta.json (reads the whole file: optional, not done on open)."""
        expected = self.meta["splits"][self.split].get("sha256")
        if not expected:
            raise DataError(f"{self.data_dir / META_NAME} records no sha256 for split '{self.split}', so "
                            f"{self.path} cannot be verified; re-run prepare_data.py --force to record it")
        sha = hashlib.sha256()
        for chunk in self._chunks():
            sha.update(memoryview(np.ascontiguousarray(chunk)))
        digest = sha.hexdigest()
        if digest != expected:
            raise DataError(f"{self.path} has sha256 {digest}, {META_NAME} says {expected}: the file changed "
                            "since it was prepared (corrupted or overwritten); re-run prepare_data.py --force")
        return digest


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
