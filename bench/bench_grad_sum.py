"""How far a cross-rank gradient sum in bf16 lands from the exact sum, against the same sum in fp32.

DeepSpeed's `communication_data_type` defaults to the training dtype, so with bf16 on, ZeRO's reduce-scatter adds
the ranks' gradients in bf16: NCCL's ring rounds the running sum to bf16 at every hop (n - 1 roundings for n
ranks; a tree needs about log2 n). `data_types.grad_accum_dtype: fp32` covers only the micro-batch sum on one
rank. This takes real gradients (one per simulated rank: the mini preset on distinct windows of real TinyStories,
forward and backward in bf16, as a rank computes them) and sums them the ring's way in bf16 and in fp32, against
the float64 sum. It also prints how much two independent global batches' gradients differ (the noise SGD already
lives with), so the error has a scale.

    python bench/bench_grad_sum.py [--ranks 8 16 32 64] [--seq_len 256] [--micro 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, command_line, machine_info, machine_line, markdown_table  # noqa: E402

STORIES = REPO.parent / "shared" / "data" / "tinystories" / "train.txt"


def rank_gradients(n: int, seq_len: int, micro: int, model_name: str) -> list[torch.Tensor]:
    """One flat fp32 copy of the bf16 gradient per simulated rank, each from its own windows."""
    from gptoss.config import get_config
    from gptoss.model import build_model
    from gptoss.tokenizer import EOT_ID, encode

    text = STORIES.read_text(encoding="utf-8")[: 400 * n * micro * seq_len]
    ids = torch.tensor(encode(text)[: n * micro * (seq_len + 1)], dtype=torch.long)
    if len(ids) < n * micro * (seq_len + 1):
        raise SystemExit(f"{STORIES}: too little text for {n} ranks x {micro} x {seq_len + 1} tokens")
    windows = ids.view(n, micro, seq_len + 1)
    # The data vocabulary (rows for the ids this text uses): the same model as the full vocabulary's, without
    # 201k-row gradients per rank that would hold tens of GB for 128 simulated ranks.
    cfg = dataclasses.replace(get_config(model_name), kept_ids=sorted(set(ids.tolist()) | {EOT_ID}))
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    grads = []
    for r in range(n):
        model.zero_grad(set_to_none=True)
        model(windows[r, :, :-1], targets=windows[r, :, 1:]).loss.backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
    return grads


def ring_sum(grads: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The running sum rounded to `dtype` after each addition, as a ring reduce-scatter adds chunk by chunk."""
    total = grads[0].to(dtype)
    for g in grads[1:]:
        total = (total.float() + g.to(dtype).float()).to(dtype)
    return total.double()


def exact_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(grads[0], dtype=torch.float64)
    for g in grads:
        total += g
    return total


def rel_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x - exact).norm() / exact.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--model", default="mini")
    args = parser.parse_args()
    if not STORIES.is_file():
        print(f"skipped: {STORIES} not found (the real TinyStories subset lives in ../shared/data)")
        return 0
    torch.set_num_threads(2)
    n_max = max(args.ranks)
    grads = rank_gradients(2 * n_max, args.seq_len, args.micro, args.model)  # two disjoint global batches
    first, second = grads[:n_max], grads[n_max:]
    rows = []
    for n in args.ranks:
        exact, other = exact_sum(first[:n]), exact_sum(second[:n])
        bf16, fp32 = ring_sum(first[:n], torch.bfloat16), ring_sum(first[:n], torch.float32)
        rows.append([n, f"{rel_error(bf16, exact):.2e}", f"{rel_error(fp32, exact):.2e}",
                     f"{rel_error(other, exact):.2e}",
                     f"{float(np.median((bf16 - exact).abs() / exact.abs().clamp(min=1e-30))):.2e}"])
    print(f"{command_line()}\n{machine_line(machine_info()).rstrip('.')}; model {args.model}, "
          f"{grads[0].numel():,} gradient values per rank, {args.micro} x {args.seq_len} tokens each\n")
    print(markdown_table(["ranks", "bf16 ring sum: rel. L2 error", "fp32 ring sum",
                          "another global batch (noise)", "bf16 ring: median elementwise"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
