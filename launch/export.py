"""Export a training checkpoint to a Hugging Face model directory (safetensors + config.json), on CPU.

    python launch/export.py runs/nano --out exports/nano                 # the run's `latest` checkpoint
    python launch/export.py runs/nano/checkpoints --tag step00001000 --out exports/nano-1k --dtype bf16
    python launch/export.py runs/nano --out exports/nano-fp32 --fp32     # fp32 master weights (ZeRO states)

The result loads with transformers.GptOssForCausalLM.from_pretrained (GPT2LMHeadModel for the baseline;
a GPT-2 shape it cannot hold, heads x head_dim != hidden, is written in gptoss's own format with a notice)
and with launch/sample.py. With o200k_harmony's vocabulary it also carries Hugging Face tokenizer files
(--tokenizer), so transformers.AutoTokenizer and pipeline("text-generation") load it too.
The checkpoint is checked against its manifest first (file sizes; every crc32 with --verify_checkpoint).
Exit status 2 on an unusable or damaged checkpoint or flag (one line on stderr; a damaged one names the file
and the newest older tag that verifies).
"""

from __future__ import annotations

import argparse
import sys

from gptoss.errors import exit_on_user_error
from gptoss.export import export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run dir (with checkpoints/), checkpoints dir (with 'latest') or one tag dir")
    p.add_argument("--out", required=True, help="output directory (written via a temporary dir, then renamed)")
    p.add_argument("--tag", default=None, help="checkpoint tag to export (default: the one named by 'latest')")
    p.add_argument("--config", default=None,
                   help="model preset or JSON config (default: the one saved in the checkpoint or run dir)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="weights dtype (default: as trained; fp32 with --fp32)")
    p.add_argument("--fp32", action="store_true",
                   help="export the fp32 master weights from the ZeRO-1/2 optimizer states instead of the "
                   "(bf16) module weights")
    p.add_argument("--max_shard_size", default="5GB",
                   help="largest safetensors file before sharding, e.g. 5GB, 500MiB (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--tokenizer", choices=["auto", "yes", "no"], default="auto",
                   help="write Hugging Face tokenizer files (tokenizer.json ...) for AutoTokenizer / pipeline: "
                   "auto = when the model has o200k_harmony's vocabulary and transformers' tokenizers package "
                   "is installed; yes = require both; no = never (default: %(default)s)")
    p.add_argument("--verify_checkpoint", action="store_true",
                   help="read every checkpoint file and compare its crc32 with the manifest before exporting "
                   "(file sizes are always checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@exit_on_user_error("export.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = export(args.path, args.out, tag=args.tag, config=args.config, dtype=args.dtype,
                 master_weights=args.fp32, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                 progress=not args.quiet, tokenizer=args.tokenizer,
                 verify_checkpoint=args.verify_checkpoint)
    print(f"exported -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
