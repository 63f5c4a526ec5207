"""The data-vocabulary head with and without its pad rows: loss forward + backward, same kernel, side by side.

    python bench/bench_head_pad.py                     # CPU: 9,531 rows (the shared subset) vs 9,536, nano's hidden
    python bench/bench_head_pad.py --tokens 256 --repeats 2          # smoke, seconds

What one call is: `LOSS_KERNELS[impl](hidden, weight, targets, None, ln N, pad_rows)` and `torch.autograd.grad`
of it w.r.t. hidden [tokens x hidden] and weight [rows x hidden] (grad_output 0.5), as in bench/bench_loss.py.
"unpadded" is the |S| + 1-row weight (kept rows, then the tail), the head before the padding; "padded" the
same weight with `ModelConfig.embedding_rows - rows` zero rows before the tail (row count a multiple of 64) and
their logits masked out. Both sides of a kernel run in one process, alternated call by call, after a wait for a
quiet machine; each call's wall and process CPU time are recorded (`measure`). "loss" is each side's value (the
same inputs, so equal up to rounding) and "max Δgrad" the largest absolute difference of the padded side's hidden
and real-row weight gradients from the unpadded side's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loss  # noqa: E402  (bench/ is not a package)
import common  # noqa: E402

from gptoss.config import get_config  # noqa: E402
from gptoss.model.kernels.head_loss import LOSS_KERNELS  # noqa: E402
from gptoss.tokenizer import EOT_ID  # noqa: E402


def padded_rows(rows: int) -> int:
    """The row count the model gives a data vocabulary of `rows` - 1 kept ids (`ModelConfig.embedding_rows`)."""
    return get_config("nano", kept_ids=[*range(rows - 2), EOT_ID]).embedding_rows


def sides(rows: int, tokens: int, hidden: int, dtype: torch.dtype) -> dict[str, tuple[Any, ...]]:
    """{"unpadded", "padded"}: (hidden, weight, targets, ln N, pad_rows) of the same data vocabulary."""
    h, w, t, log_tail = bench_loss.make_inputs(tokens, hidden, rows, "cpu")
    pad = padded_rows(rows) - rows
    w_pad = torch.cat([w[:-1], w.new_zeros(pad, hidden), w[-1:]])
    t_pad = torch.where(t == rows - 1, rows - 1 + pad, t)
    return {"unpadded": (h.to(dtype), w.to(dtype), t, log_tail, 0),
            "padded": (h.to(dtype), w_pad.to(dtype), t_pad, log_tail, pad)}


def step(impl: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, log_tail: float | None, pad: int
         ) -> tuple[float, list[torch.Tensor]]:
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = LOSS_KERNELS[impl](h, w, t, None, log_tail, pad)
    return loss.item(), list(torch.autograd.grad(loss * 0.5, (h, w)))


def measure(impl: str, inputs: dict[str, tuple[Any, ...]], repeats: int
            ) -> tuple[dict[str, dict[str, common.Timing]], dict[str, tuple[float, list[torch.Tensor]]]]:
    """Both sides of one kernel alternated call by call after one warm-up each: {side: {"wall": Timing, "cpu":
    Timing}} and the last call's (loss, gradients). "cpu" is this process's CPU time, which other jobs on a
    shared machine disturb far less than the wall clock (with one thread: none of the time they hold the core)."""
    out: dict[str, tuple[float, list[torch.Tensor]]] = {}
    seconds: dict[str, dict[str, list[float]]] = {side: {"wall": [], "cpu": []} for side in inputs}
    for i in range(repeats + 1):
        for side in inputs:
            wall, cpu = time.perf_counter(), time.process_time()
            out[side] = step(impl, *inputs[side])
            if i:
                seconds[side]["wall"].append(time.perf_counter() - wall)
                seconds[side]["cpu"].append(time.process_time() - cpu)
    return {side: {k: common.Timing(v) for k, v in s.items()} for side, s in seconds.items()}, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=9531, help="unpadded rows, kept ids + tail (default: %(default)s, "
                   "the shared TinyStories subset)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (nano: 512)")
    p.add_argument("--impls", default="chunked,fused", help="comma-separated loss kernels")
    p.add_argument("--dtype", choices=sorted(bench_loss.DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=11, help="timed calls per side after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    common.add_quiet_machine_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    info = common.machine_info()
    inputs = sides(args.rows, args.tokens, args.hidden, bench_loss.DTYPES[args.dtype])
    k = args.rows - 1  # kept rows
    table = []
    for impl in args.impls.split(","):
        common.wait_until_quiet(args.max_load, args.wait_s)
        timing, out = measure(impl, inputs, args.repeats)
        (_, (dh, dw)), (_, (dh_pad, dw_pad)) = out["unpadded"], out["padded"]
        assert not dw_pad[k:-1].any(), "pad rows got a gradient"
        diff = max((dh_pad - dh).abs().max().item(), (torch.cat([dw_pad[:k], dw_pad[-1:]]) - dw).abs().max().item())
        for side in inputs:
            wall, cpu, rows = timing[side]["wall"], timing[side]["cpu"], inputs[side][1].shape[0]
            base = timing["unpadded"]["cpu"]
            table.append([impl, f"{side} ({rows:,} rows)", f"{wall.best * 1e3:,.0f}", f"{wall.median * 1e3:,.0f}",
                          f"{cpu.best * 1e3:,.0f}", f"{cpu.median * 1e3:,.0f}", f"{base.best / cpu.best:.3f}x",
                          f"{base.median / cpu.median:.3f}x", f"{out[side][0]:.6f}",
                          "" if side == "unpadded" else f"{diff:.1e}"])
    print(f"`{common.command_line()}`\n\n{common.machine_line(info)} {args.tokens:,} tokens x hidden {args.hidden}, "
          f"{args.dtype}; best and median of {args.repeats} calls per side, alternated, after one warm-up each; speed: "
          "of the padded head relative to the unpadded one, by CPU time.\n")
    print(common.markdown_table(["kernel", "head", "wall best ms", "wall median ms", "CPU best ms", "CPU median ms",
                                 "speed (CPU best)", "speed (CPU median)", "loss", "max Δgrad"], table,
                                align="llrrrrrrrr"))


if __name__ == "__main__":
    main()
