"""The output head's loss alone, forward + backward: the chunked loss vs the fused one.

    python bench/bench_loss.py                 # CPU: 201,088 and 8,600 rows, hidden 512, 2,048 tokens, fp32
    python bench/bench_loss.py --rows 4096 --tokens 256 --hidden 64 --repeats 1     # toy smoke, seconds

What one call is: `gptoss.model.kernels.head_loss.LOSS_KERNELS[impl](hidden, weight, targets, ...)` and
`torch.autograd.grad` of it w.r.t. hidden [tokens x hidden] and weight [rows x hidden], as in a training step
(grad_output 0.5, like DeepSpeed's 1 / accumulation). 201,088 rows is the full o200k vocabulary; fewer rows is
a data vocabulary (`--vocab data`), whose last row is the shared tail of the other 201,088 - rows + 1 ids
(log_tail_size = ln of that). Chunks: the default of both, at most 2^28 logits (at 201,088 rows: 1,334 tokens,
so chunked checkpoints and recomputes; at 8,600 one chunk, where chunked does not checkpoint).

Each (rows, impl) runs in a fresh process (bench/common.py `run_worker`), waits for a quiet machine, builds its
inputs, resets the peak RSS and times --repeats calls after one warm-up; "extra MiB" is the peak RSS during the
calls minus the RSS before them (inputs excluded; on CUDA torch.cuda.max_memory_allocated above the inputs).
"loss" is the value each computed on the same inputs. Prints one markdown table with the command and machine.
`measure` and `parity` (each impl in bf16 against all logits at once in fp32) are also bench/gpu_check.py's
loss stage on the GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

FULL_VOCAB = 201088
IMPLS = ("chunked", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(tokens: int, hidden: int, rows: int, device: Any, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
    """fp32 hidden, weight, targets (every 16th ignored, some on the tail) and ln N of a
    data vocabulary's tail (None at the full vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(rows, hidden, generator=g) * (2 / math.sqrt(hidden))  # logits of std 2
    t = torch.randint(0, rows, (tokens,), generator=g)
    t[::16] = -100
    log_tail = None
    if rows < FULL_VOCAB:
        t[1::8] = rows - 1
        log_tail = math.log(FULL_VOCAB - rows + 1)
    return h.to(device), w.to(device), t.to(device), log_tail


def step(impl: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, log_tail: float | None,
         chunk_tokens: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training-step head: the loss and d(0.5 x loss)/d(hidden, weight). impl "plain": all logits at once."""
    from gptoss.model.kernels.head_loss import IGNORE_INDEX, LOSS_KERNELS

    if impl == "plain":  # the reference: [tokens x rows] fp32 logits, the tail's ln N as in gptoss.model.head
        logits = torch.nn.functional.linear(h, w).float()
        if log_tail is not None:
            logits = torch.cat([logits[:, :-1], logits[:, -1:] + log_tail], dim=-1)
        loss = torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE_INDEX)
        if log_tail is not None:
            loss = loss + log_tail * (t == w.shape[0] - 1).sum() / (t != IGNORE_INDEX).sum()
    else:
        loss = LOSS_KERNELS[impl](h, w, t, chunk_tokens, log_tail)
    return loss.detach(), list(torch.autograd.grad(loss * 0.5, (h, w)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(impl: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, log_tail: float | None, repeats: int,
            warmup: int = 1, chunk_tokens: int | None = None) -> dict[str, Any]:
    """Seconds per call (best, median) and the peak bytes above what existed before the calls."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out: dict[str, Any] = {}

    def call() -> None:
        out["loss"] = step(impl, h, w, t, log_tail, chunk_tokens)[0].item()  # .item() syncs
        _sync(h.device)

    cuda = h.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        common.reset_peak_rss()
        before = common.rss_bytes()
    timing = common.time_fn(call, repeats, warmup)
    peak = torch.cuda.max_memory_allocated() if cuda else common.peak_rss_bytes()
    return {"best": timing.best, "median": timing.median, "extra": peak - before, "loss": out["loss"]}


def parity(impls: list[str], dtype: torch.dtype, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor,
           log_tail: float | None, chunk_tokens: int | None = None) -> dict[str, tuple[float, float]]:
    """Per impl in `dtype` against "plain" in fp32: (loss |Δ|, max over hidden/weight of max |Δgrad| / max |grad|).
    `impls` may include "plain" itself, whose error in `dtype` is the rounding every impl is held to."""
    def run(impl: str, dt: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss, grads = step(impl, h.to(dt).requires_grad_(), w.to(dt).requires_grad_(), t, log_tail, chunk_tokens)
        return loss.float(), [g.float() for g in grads]

    ref = run("plain", torch.float32)
    errors = {}
    for impl in impls:
        loss, grads = run(impl, dtype)
        errors[impl] = ((loss - ref[0]).abs().item(),
                        max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref[1])))
    return errors


def worker(args: argparse.Namespace) -> None:
    impl, rows = args.worker.split(":")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    h, w, t, log_tail = make_inputs(args.tokens, args.hidden, int(rows), device)
    dtype = DTYPES[args.dtype]
    common.emit_result(measure(impl, h.to(dtype), w.to(dtype), t, log_tail, args.repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=f"{FULL_VOCAB},8600",
                   help="comma-separated head rows: 201088 the full vocabulary, fewer a data vocabulary with its tail")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (nano: 512)")
    p.add_argument("--impls", default="chunked,fused", help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--timeout_s", type=float, default=900, help="per worker process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    common.add_quiet_machine_args(p)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    info = common.machine_info()
    flags = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--dtype", args.dtype, "--device",
             args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        base: dict[str, Any] | None = None
        for impl in args.impls.split(","):
            common.wait_until_quiet(args.max_load, args.wait_s)
            r = common.run_worker(__file__, [*flags, "--worker", f"{impl}:{rows}"], args.timeout_s)
            label = f"{rows:,}" + (" (full)" if rows >= FULL_VOCAB else " (data vocab, tail)")
            if "error" in r:
                rows_out.append([label, impl, r["error"], "", "", "", "", ""])
                continue
            base = base or (r if impl == "chunked" else None)
            speed = args.tokens / r["best"]
            vs = (f"{base['best'] / r['best']:.2f}x", f"{r['extra'] / base['extra']:.2f}x") if base else ("", "")
            mib = r["extra"] / 2**20
            rows_out.append([label, impl, f"{speed:,.0f}", f"{r['median']:.3f}", f"{mib:,.0f}", vs[0], vs[1],
                             f"{r['loss']:.6f}"])
    print(f"`{common.command_line()}`\n\n{common.machine_line(info)} {args.tokens:,} tokens x hidden {args.hidden}, "
          f"{args.dtype} on {args.device}; best of {args.repeats} after one warm-up.\n")
    print(common.markdown_table(["rows", "impl", "tokens/s", "median s/call", "extra MiB", "speed vs chunked",
                                 "memory vs chunked", "loss"], rows_out, align="llrrrrrr"))


if __name__ == "__main__":
    main()
