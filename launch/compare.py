"""Train models on the same data, token budget and schedule, then compare their validation loss.

    python launch/prepare_data.py --synthetic 20000 --out data/synthetic
    python launch/compare.py --models tiny,gpt2-tiny --data data/synthetic --out runs/compare-tiny \\
        --max_steps 60 --seq_len 64 --eval_every 10                              # CPU scale, ~10 min
    python launch/compare.py --models nano,gpt2-nano --ds_config ds_configs/a40.json \\
        --data data/tinystories --out runs/compare-nano --tokens 500000000      # one GPU
    python launch/compare.py --runs runs/compare-nano/nano,runs/compare-nano/gpt2-nano --out runs/compare-nano

Runs train one after another with launch/train.py (identical flags except --model/--out) into
OUT/<model>; OUT/comparison.png plots validation loss against tokens and training seconds, and
OUT/comparison.md tabulates final loss, throughput and parameter counts.
"""

from __future__ import annotations

import argparse
import sys

from gptoss.errors import exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--models", help="comma-separated presets or config JSONs to train, e.g. nano,gpt2-nano")
    what.add_argument("--runs", help="comma-separated existing run dirs: only plot and tabulate them")
    p.add_argument("--out", required=True, help="output dir (run dirs go inside it when training)")
    p.add_argument("--data", default=None, help="prepared data dir (launch/prepare_data.py); needed with --models")
    p.add_argument("--ds_config", default="ds_configs/cpu.json", help="DeepSpeed config (default: %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max_steps", type=int, default=None, help="optimizer steps per model")
    budget.add_argument("--tokens", type=int, default=None, help="tokens per model (steps derived by the trainer)")
    p.add_argument("--seq_len", type=int, default=1024,
                   help="training sequence length (default: %(default)s, the trainer's)")
    p.add_argument("--eval_every", type=int, default=200, help="evaluate every N steps (default: %(default)s)")
    p.add_argument("--log_every", type=int, default=10, help="log every N steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (default: %(default)s)")
    p.add_argument("--vocab", choices=("data", "full"), default="full",
                   help="the trainer's --vocab for every run (data: rows only for the ids the data uses; "
                        "losses stay full-vocabulary ones, comparable across runs; default: %(default)s)")
    return p.parse_args(argv)


@exit_on_user_error("compare.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gptoss.analysis.compare import compare

    train_kw = {} if args.runs else dict(
        ds_config=args.ds_config, max_steps=args.max_steps, tokens=args.tokens, seq_len=args.seq_len,
        eval_every=args.eval_every, log_every=args.log_every, seed=args.seed, extra=("--vocab", args.vocab))
    paths = compare(args.out, models=args.models.split(",") if args.models else None,
                    runs=args.runs.split(",") if args.runs else None, data=args.data, **train_kw)
    print(f"plot: {paths['png']}\ntable: {paths['md']}\n\n{paths['md'].read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
