"""Tokenize a text corpus into train.bin / val.bin + meta.json for training (see gptoss.data).

    python launch/prepare_data.py --synthetic 20000 --out data/synthetic   # stories of gptoss's own grammar
    python launch/prepare_data.py --out data/tinystories              # roneneldan/TinyStories from the hub
    python launch/prepare_data.py --source 'stories/*.jsonl' --out data/mine
"""

from __future__ import annotations

import argparse
import logging
import sys

from gptoss.data import DEFAULT_SOURCE, prepare_dataset
from gptoss.errors import exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", type=int, default=None, metavar="N",
                     help="generate N stories (and N/10 validation stories) from gptoss's own story grammar, "
                     "seeded by --seed; meta.json records their exact entropy in bits per byte (the floor)")
    src.add_argument("--source", default=None,
                     help=f"hub dataset name (default {DEFAULT_SOURCE}), a .txt (stories separated by "
                     "<|endoftext|> lines), .jsonl/.json/.parquet file, a directory or a quoted glob")
    p.add_argument("--out", default="data/tinystories", help="output directory (default: %(default)s)")
    p.add_argument("--text_column", default="text", help="column holding the documents (default: %(default)s)")
    p.add_argument("--num_proc", type=int, default=None,
                   help="tokenizer processes (default: scales with the data, up to the CPU count)")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="documents held out for validation when the source has no validation split "
                   "(default: %(default)s; at least one document)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the validation holdout, or of the --synthetic stories (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-prepare even if --out already holds finished data")
    return p.parse_args(argv)


@exit_on_user_error("prepare_data.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = prepare_dataset(
        args.source, args.out, synthetic=args.synthetic, text_column=args.text_column, num_proc=args.num_proc,
        val_fraction=args.val_fraction, seed=args.seed, force=args.force,
    )
    floors = meta.get("synthetic", {}).get("entropy_bits_per_byte", {})
    for split, info in meta["splits"].items():
        floor = f"  entropy {floors[split]:.4f} bits/byte" if split in floors else ""
        print(f"{split:>5}: {info['tokens']:>14,} tokens  {info['documents']:>10,} documents  {info['file']}{floor}")
    print(f"{meta['tokens_per_second']:,.0f} tokens/s  ->  {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
