"""`prepare_dataset`: the one place text turns into token files (`train.bin`, `val.bin`, `meta.json`).

Documents come from `sources`; they are tokenized in parallel with o200k_harmony (`datasets.map`, every
document followed by <|endoftext|>), each split is streamed to disk under a temporary name, and the files are
renamed into place with meta.json last, so an interrupted run never leaves output that looks finished
(the format is in `layout`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from gptoss.data.layout import (
    META_NAME,
    TOKEN_COUNTS_NAME,
    DataError,
    is_finished,
    new_meta,
    read_meta,
    write_meta,
    write_split,
    write_token_counts,
)
from gptoss.data.sources import DEFAULT_SOURCE, check_columns, holdout, load_files, load_hub, resolve_source
from gptoss.data.synthetic import entropy_bits_per_byte, generate_corpus
from gptoss.tokenizer import ENCODING_NAME, EOT_ID, VOCAB_SIZE, get_encoding

log = logging.getLogger(__name__)


def _tokenize_batch(batch: dict[str, list], text_column: str) -> dict[str, list]:
    """Empty documents are dropped; every kept one ends with <|endoftext|>.

    A plain loop, not `encode_ordinary_batch`: on story-sized documents its thread pool costs more than it
    saves (measured 2x slower with 1-2 threads); parallelism comes from `map(num_proc=...)` instead.
    """
    enc = get_encoding()  # looked up here, not captured: datasets hashes the function for its cache key
    texts = [t for t in batch[text_column] if t and not t.isspace()]
    ids = [enc.encode_ordinary(t) for t in texts]
    for doc in ids:
        doc.append(EOT_ID)
    # UTF-8 bytes per document, for bits per byte (<|endoftext|> is no text: 0 bytes)
    return {"ids": ids, "len": [len(doc) for doc in ids], "bytes": [len(t.encode("utf-8")) for t in texts]}


def _tokenize(ds: Any, split: str, text_column: str, num_proc: int | None) -> Any:
    import datasets

    if num_proc is None:  # a worker costs ~0.5 s to start: one per 20k documents, up to the cores
        num_proc = min(os.cpu_count() or 1, 16, max(1, ds.num_rows // 20_000))
    num_proc = max(1, min(num_proc, ds.num_rows))
    features = datasets.Features(
        {"ids": datasets.List(datasets.Value("uint32")), "len": datasets.Value("int64"),
         "bytes": datasets.Value("int64")}
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


def _write_split(ds: Any, path: Path, split: str) -> tuple[dict[str, Any], np.ndarray]:
    """Stream the tokenized split into `path` (`layout.write_split`), with a progress bar; its meta entry counts
    the documents' UTF-8 bytes too."""
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    total = pc.sum(ds.with_format("arrow")["len"]).as_py()
    utf8_bytes = int(pc.sum(ds.with_format("arrow")["bytes"]).as_py())
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"write {split}") as bar:
        def chunks() -> Iterator[np.ndarray]:
            for table in ds.with_format("arrow").iter(batch_size=10_000):
                arr = pc.list_flatten(table["ids"]).to_numpy()
                bar.update(arr.size)
                yield arr

        info, counts = write_split(path, chunks(), VOCAB_SIZE)
    return {**info, "documents": ds.num_rows, "bytes": utf8_bytes}, counts


def _synthetic_splits(n: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The splits of `prepare_dataset(synthetic=n)` (one seeded draw) and meta.json's record of their entropy."""
    import datasets

    n_val = max(1, n // 10)
    stories = generate_corpus(n + n_val, seed)
    parts = {"train": stories[:n], "val": stories[n:]}
    splits = {k: datasets.Dataset.from_dict({"text": [s.text for s in v]}) for k, v in parts.items()}
    info = {"generator": "gptoss.data.synthetic", "seed": seed, "stories": {k: len(v) for k, v in parts.items()},
            "entropy_bits_per_byte": {k: entropy_bits_per_byte(v) for k, v in parts.items()},
            "bits": {k: sum(s.bits for s in v) for k, v in parts.items()}}
    return splits, info


def prepare_dataset(
    source: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "data/tinystories",
    *,
    synthetic: int | None = None,
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
    .jsonl/.json/.parquet file with `text_column`, a directory or a glob of such files. `synthetic=N`
    instead writes N stories of gptoss's own grammar (`gptoss.data.synthetic`, seeded by `seed`) plus
    N // 10 (at least 1) validation stories, and records their exact entropy in meta.json["synthetic"].
    Each split's meta records its UTF-8 bytes (for bits per byte). The validation split is the source's own
    (hub: `val_split` or the first of validation/valid/val/dev; files: names containing valid/validation/val/dev)
    when there is one, else a seeded random `val_fraction` of the documents (at least one). Finished output with
    the same settings is left as is unless `force`.
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
    if synthetic is not None and source is not None:
        raise DataError("pass either a source or synthetic=N stories, not both")
    if synthetic is not None and synthetic < 1:
        raise DataError(f"synthetic must be >= 1 stories, got {synthetic}")
    if synthetic is not None:
        files, description = None, f"gptoss synthetic stories (n={synthetic}, seed={seed})"
    else:
        source = os.fspath(source or DEFAULT_SOURCE)
        files, description = resolve_source(source)
    settings = {"source": description, "text_column": text_column, "val_fraction": val_fraction,
                "seed": seed, "train_split": train_split, "val_split": val_split, "tokenizer": ENCODING_NAME}

    if is_finished(out) and not force:
        meta = read_meta(out)
        if meta.get("settings") != settings:
            raise DataError(
                f"{out} already holds data prepared from {meta.get('source')!r} with other settings; "
                "pass force=True (--force) to overwrite it, or choose another output dir"
            )
        log.info("%s is already prepared (%s); nothing to do (force=True re-prepares)", out, meta["source"])
        return meta

    extra = {}
    if synthetic is not None:
        splits, extra["synthetic"] = _synthetic_splits(synthetic, seed)
        text_column, val_from = "text", "synthetic stories drawn after the training ones"
    else:
        splits = load_files(files, text_column) if files else load_hub(source, train_split, val_split)
        val_from = "source validation split"
    check_columns(splits, text_column, description)
    if "val" not in splits:
        splits["train"], splits["val"] = holdout(splits["train"], val_fraction, seed, description)
        val_from = f"seeded holdout (val_fraction={val_fraction}, seed={seed})"

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stale_names = ("*.bin.*.tmp", f"{META_NAME}.*.tmp", f"{TOKEN_COUNTS_NAME}.*.tmp")
    for stale in [p for pattern in stale_names for p in out.glob(pattern)]:  # left by a killed run
        stale.unlink()
    tmp_bins: dict[str, Path] = {}
    counts_tmp = out / f"{TOKEN_COUNTS_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    stats: dict[str, dict[str, Any]] = {}
    id_counts: dict[str, np.ndarray] = {}
    try:
        # Old finished output stays intact until every new split is fully on disk under a temp name.
        for split, ds in splits.items():
            tokenized = _tokenize(ds, split, text_column, num_proc)
            if tokenized.num_rows == 0:
                raise DataError(f"{description}: split '{split}' has no non-empty documents")
            tmp_bins[split] = out / f"{split}.bin.{uuid.uuid4().hex[:8]}.tmp"
            info, id_counts[split] = _write_split(tokenized, tmp_bins[split], split)
            stats[split] = {"file": f"{split}.bin", **info}
        write_token_counts(counts_tmp, id_counts)
        seconds = time.perf_counter() - t0  # tokenize + write
        n_tokens = sum(s["tokens"] for s in stats.values())
        meta = new_meta(tokenizer=ENCODING_NAME, vocab_size=VOCAB_SIZE, eot_id=EOT_ID, source=description,
                        splits=stats, val_from=val_from, settings=settings, seconds=round(seconds, 3),
                        tokens_per_second=round(n_tokens / max(seconds, 1e-9), 1),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra)
        (out / META_NAME).unlink(missing_ok=True)  # from here until the end the dir is "unfinished"
        for split, tmp in tmp_bins.items():
            os.replace(tmp, out / stats[split]["file"])
        os.replace(counts_tmp, out / TOKEN_COUNTS_NAME)
        write_meta(out, meta)
    finally:
        for tmp in [*tmp_bins.values(), counts_tmp]:
            tmp.unlink(missing_ok=True)
    log.info(
        "prepared %s in %.1fs (%.0f tokens/s): %s", out, seconds, meta["tokens_per_second"],
        ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in stats.items()),
    )
    return meta
