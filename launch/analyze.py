"""Pictures and tables of a model or a run (PNG + markdown written to --out).

    python launch/analyze.py report --model nano --out out/report               # params, KV cache, FLOPs
    python launch/analyze.py report --model gpt-oss-20b,gpt-oss-120b --context 131072 --out out/report
    python launch/analyze.py expert-usage --run runs/nano --out out/experts     # load over training
    python launch/analyze.py expert-usage --model exports/nano --out out/experts  # run it on synthetic stories
    python launch/analyze.py attention --model exports/nano --prompt "Once upon a time" --out out/attention
    python launch/analyze.py attention --model runs/tiny --token_ids 1,8,43,218 --out out/attention

--model of expert-usage / attention: an export dir (launch/export.py) or a run / checkpoint dir.
--token_ids: token ids given directly instead of text (o200k_harmony), for models with a smaller vocabulary.
--model of report: a preset (nano, tiny, gpt2-nano, gpt-oss-20b, gpt-oss-120b), a config JSON, or a dir.
"""

from __future__ import annotations

import argparse
import sys

from gptoss.errors import exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("report", help="parameters total/active, KV cache per token, FLOPs per token")
    r.add_argument("--model", default="nano", help="preset, config JSON or dir; comma-separated for several "
                   "(default: %(default)s)")
    r.add_argument("--context", type=int, default=4096, help="context length for KV cache and attention FLOPs "
                   "(default: %(default)s)")
    r.add_argument("--bytes_per_elem", type=int, default=2, help="KV cache element size, 2 = bf16 "
                   "(default: %(default)s)")

    e = sub.add_parser("expert-usage", help="tokens per expert per layer, over training or on text")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run dir: heatmaps of the logged expert_load over training")
    src.add_argument("--model", help="export or run dir: run the model on --text (or --token_ids) and count "
                     "assignments")
    inp = e.add_mutually_exclusive_group()
    inp.add_argument("--text", default=None, help="text file for --model (default: 20 synthetic stories)")
    inp.add_argument("--token_ids", default=None, help="comma-separated token ids for --model instead of text "
                     "(small-vocabulary models); fewer than --seq_len run as one pass")
    e.add_argument("--seq_len", type=int, default=256, help="tokens per forward pass (default: %(default)s)")
    e.add_argument("--max_batches", type=int, default=8, help="forward passes at most (default: %(default)s)")

    a = sub.add_parser("attention", help="per-head attention maps of a sliding and a full layer, sink mass")
    a.add_argument("--model", required=True, help="export or run dir")
    prompt = a.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (o200k_harmony)")
    prompt.add_argument("--token_ids", "--prompt_ids", dest="token_ids",
                        help="prompt as comma-separated token ids (small-vocabulary models)")
    a.add_argument("--layers", default=None, help="comma-separated layer indices (default: the first sliding "
                   "and the first full layer)")

    for s in (r, e, a):
        s.add_argument("--out", default="out/analysis", help="output dir (default: %(default)s)")
    return p.parse_args(argv)


def _ints(text: str | None, flag: str) -> list[int] | None:
    from gptoss.analysis.loading import parse_ints

    return None if text is None else parse_ints(text, flag)


@exit_on_user_error("analyze.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "report":
        from gptoss.analysis.report import write_report

        paths = write_report(args.model.split(","), args.out, args.context, args.bytes_per_elem)
    elif args.command == "expert-usage":
        from gptoss.analysis.experts import expert_usage

        paths = expert_usage(args.out, run=args.run, model=args.model, text=args.text,
                             token_ids=_ints(args.token_ids, "--token_ids"), seq_len=args.seq_len,
                             max_batches=args.max_batches)
    else:
        from gptoss.analysis.attention import attention_report

        paths = attention_report(args.model, args.out, prompt=args.prompt, layers=_ints(args.layers, "--layers"),
                                 token_ids=_ints(args.token_ids, "--token_ids"))
    for kind, path in paths.items():
        print(f"{kind:>4}: {path}")
    if "md" in paths:
        print("\n" + paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
