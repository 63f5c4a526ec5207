"""Text → tokens on disk → batches.

    sources.py   a hub name or local .txt/.jsonl/.json/.parquet files (a file, a dir, a glob) → `datasets` splits
    synthetic.py stories of gptoss's own grammar with their exact entropy (tests, quickstart; nothing copied)
    prepare.py   `prepare_dataset`: tokenize in parallel with o200k_harmony into the format of `layout`
    layout.py    that on-disk format (uint32 ids, token_counts.npz, meta.json) and its one writer; `DataError`
    dataset.py   `TokenDataset`: one split memory-mapped and checked against its meta
    sampler.py   `BatchSampler`: windows as a pure function of (seed, step); `eval_batches`, `whole_split_batches`
    vocab.py     the kept set of the data vocabulary (`--vocab data`), from token_counts.npz
"""

from gptoss.data.dataset import TokenDataset
from gptoss.data.layout import DTYPE, DataError, write_prepared
from gptoss.data.prepare import prepare_dataset
from gptoss.data.sampler import IGNORE_INDEX, BatchSampler, eval_batches, whole_split_batches
from gptoss.data.sources import DEFAULT_SOURCE
from gptoss.data.vocab import data_kept_ids, kept_set

__all__ = [
    "DEFAULT_SOURCE",
    "DTYPE",
    "IGNORE_INDEX",
    "BatchSampler",
    "DataError",
    "TokenDataset",
    "data_kept_ids",
    "eval_batches",
    "kept_set",
    "prepare_dataset",
    "whole_split_batches",
    "write_prepared",
]
