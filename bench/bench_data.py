"""Data pipeline throughput: prepare_dataset (1 and N processes) vs a plain tiktoken loop, and batch sampling.

    python bench/bench_data.py                 # ~20 MB of TinyStories-like text, N = CPU count
    python bench/bench_data.py --mb 100 --num_proc 8

The corpus is the shipped sample stories repeated (numbered so documents differ) to --mb megabytes. Prepare
times are end to end: reading the .txt through `datasets`, tokenizing, writing uint32 files and meta.json;
each run gets a fresh `datasets` cache so nothing is reused. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

from gptoss.data import BatchSampler, TokenDataset, prepare_dataset
from gptoss.data.synthetic import generate_corpus
from gptoss.tokenizer import EOT_ID, get_encoding


def make_corpus(path: Path, mb: float) -> list[str]:
    stories = [s.text for s in generate_corpus(200, seed=0)]
    docs, size, i = [], 0, 0
    while size < mb * 1e6:
        doc = f"Story {i}. {stories[i % len(stories)]}"
        docs.append(doc)
        size += len(doc.encode()) + 15
        i += 1
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return docs


def plain_tiktoken(docs: list[str]) -> tuple[float, int]:
    """The baseline: one process, one document at a time, like a hand-written preprocessing loop."""
    enc = get_encoding()
    t0 = time.perf_counter()
    ids = [np.array([*enc.encode_ordinary(d), EOT_ID], dtype=np.uint32) for d in docs]
    n = int(np.concatenate(ids).size)
    return time.perf_counter() - t0, n


def prepare(src: Path, work: Path, num_proc: int) -> tuple[float, int]:
    datasets.config.HF_DATASETS_CACHE = str(work / f"hf-cache-{num_proc}")  # no cache hits between runs
    t0 = time.perf_counter()
    meta = prepare_dataset(str(src), work / f"out-{num_proc}", num_proc=num_proc, force=True)
    return time.perf_counter() - t0, sum(s["tokens"] for s in meta["splits"].values())


def sample_rate(data_dir: Path, batch_size: int, seq_len: int, n: int = 2000) -> float:
    """Seconds per batch drawn from the memmap (pages warm after the first pass)."""
    sampler = BatchSampler(TokenDataset(data_dir, "train", seq_len=seq_len), batch_size, seed=0)
    for _ in range(50):
        sampler.next_batch()
    t0 = time.perf_counter()
    for _ in range(n):
        sampler.next_batch()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (default: %(default)s)")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1,
                   help="processes of the parallel run (default: CPU count, %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="sampling benchmark batch (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=4096, help="sampling benchmark window (default: %(default)s)")
    args = p.parse_args()
    datasets.disable_progress_bars()
    get_encoding()  # load once, outside the timings

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "corpus.txt"
        docs = make_corpus(src, args.mb)
        mb = src.stat().st_size / 1e6
        rows = [("plain tiktoken loop, 1 process", *plain_tiktoken(docs))]
        for n in sorted({1, args.num_proc}):
            rows.append((f"prepare_dataset, num_proc={n}", *prepare(src, work, n)))
        per_batch = sample_rate(work / f"out-{args.num_proc}", args.batch_size, args.seq_len)

    base = rows[0][1]
    print(f"\nCorpus: {mb:.1f} MB, {len(docs):,} documents; {os.cpu_count()} CPU cores.\n")
    print("| tokenization | seconds | MB/s | tokens/s | vs plain loop |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, tokens in rows:
        print(f"| {name} | {seconds:.2f} | {mb / seconds:.1f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x |")
    print(f"\n| batch sampling ({args.batch_size} x {args.seq_len}, memmap) | per batch | batches/s | tokens/s |")
    print("|---|---:|---:|---:|")
    tok_s = args.batch_size * args.seq_len / per_batch
    print(f"| BatchSampler.next_batch | {per_batch * 1e6:.0f} µs | {1 / per_batch:,.0f} | {tok_s:,.0f} |")


if __name__ == "__main__":
    main()
