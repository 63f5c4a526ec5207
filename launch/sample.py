"""Generate TinyStories-style text from a trained model, streamed to the terminal as it is sampled.

    python launch/sample.py exports/nano --prompt "A little girl went to the woods"
    python launch/sample.py runs/nano --num_samples 3 --temperature 0.8 --top_k 200 --seed 1
    python launch/sample.py runs/nano --temperature 0                     # greedy

PATH is an export dir (launch/export.py) or a run/checkpoint dir (consolidated in memory). The samples are
generated as one batch and printed in order, the first as it is sampled; each stops at its own <|endoftext|>
or after --max_new_tokens. Only the stories reach stdout. Needs no DeepSpeed. Exit status 2 on an unusable
model or flag.
"""

from __future__ import annotations

import argparse
import secrets
import sys

from gptoss.errors import exit_on_user_error
from gptoss.generate import sample_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="export dir, or run / checkpoints / checkpoint-tag dir")
    # TinyStories' own opening (and that of half the synthetic stories): a prompt from outside the training stories
    # makes a small model stop at once or continue mid-story.
    p.add_argument("--prompt", default="Once upon a time",
                   help="text the story starts with (default: %(default)r)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample among the k most likely tokens; 0 = no limit (default: %(default)s)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: smallest set of tokens with this much probability (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed; sample i uses seed + i (default: a fresh one, printed on stderr)")
    p.add_argument("--num_samples", type=int, default=1,
                   help="stories to generate, as one batch; each is the story a single run with its seed gives "
                   "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute dtype; auto = fp32 on CPU, the stored dtype on GPU (default: %(default)s)")
    return p.parse_args(argv)


@exit_on_user_error("sample.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
        print(f"seed {args.seed}", file=sys.stderr)
    try:
        sample_text(args.path, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, num_samples=args.num_samples,
                    device=args.device, dtype=args.dtype)
    except KeyboardInterrupt:  # Ctrl-C while streaming: end the line, no traceback
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
