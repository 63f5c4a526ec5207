"""What every stage of bench/gpu_check.py shares: the sizes (GPU or dry run), the table being filled, the time
budget, and what later stages need from earlier ones."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]
import common  # noqa: E402  (bench/ is not a package)

KIT = REPO / "gpu_kit"
PROMPT = "Once upon a time"


@dataclass(frozen=True)
class Sizes:
    model: str  # preset
    seq_len: int
    steps: int  # trainer steps per run
    batch: tuple[int, int] | None  # (train_batch_size, micro) instead of a40.json's, or None: as shipped
    attn: tuple[int, int, int, int, int]  # parity: kv heads, query heads, T, head_dim, sliding window
    loss: tuple[int, int, int, int | None]  # parity: tokens, hidden, vocab, chunk_tokens (None: the default)
    peer: tuple[int, int, int]  # transformers step: micro, accumulation, timed steps
    expert_rows: int  # expert kernels: rows of one MoE layer (tokens x top-k) on `model`'s experts
    greedy_tokens: int
    story_tokens: int
    stories: int  # train stories (read from --data's .txt, else synthetic); val: a tenth, at least 20
    concurrent_variants: bool  # the --compile and --activation_checkpointing runs beside the others (dry run)


# 8,000 stories: ~1M tokens; 20 steps of 65,536 tokens (saved at 10 and 20) sample windows from them again
GPU = Sizes("nano", 1024, 20, None, (1, 8, 1024, 64, 128), (4096, 512, 201088, None), (16, 4, 3), 32768, 48, 120,
            8000, False)
DRY = Sizes("tiny", 64, 4, (4, 2), (2, 4, 128, 16, 16), (256, 64, 4096, 64), (2, 2, 2), 96, 12, 24, 60, True)


@dataclass
class Check:
    """The table's rows, the time budget and what later stages need from earlier ones."""

    args: argparse.Namespace
    sizes: Sizes
    work: Path
    device: Any = None
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    found: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def add(self, check: str, result: str, details: str = "") -> None:
        self.rows.append((check, result, details))
        print(f"[{time.monotonic() - self.t0:6.1f}s] {check}: {result}  {details}", file=sys.stderr, flush=True)

    def stage(self, name: str, fn: Callable[[Check], None], need_s: float) -> None:
        """Run one stage; a failure becomes a FAIL row, a stage that would overrun the budget a skipped row."""
        if self.left() < need_s:
            self.add(name, "skipped", f"time budget: {self.left():.0f} s left of --budget_s {self.args.budget_s:.0f}, "
                     f"the stage needs ~{need_s:.0f} s")
            return
        try:
            fn(self)
        except Exception as e:  # one line in the table; the traceback went to stderr
            import traceback

            traceback.print_exc()
            self.add(name, "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}")

    def table(self) -> str:
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        return common.markdown_table(["check", "result", "details"],
                                     [[cell(c) for c in row] for row in self.rows], align="lll")


def need(ck: Check, key: str, stage: str) -> Any:
    """What an earlier stage found, or a clear error naming the stage that did not deliver it."""
    if key not in ck.found:
        raise RuntimeError(f"needs the {stage} stage, which did not finish")
    return ck.found[key]


def sync(ck: Check) -> None:
    import torch

    if ck.device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(ck: Check) -> None:
    """Drop what a stage left on the GPU, so the next stage's peak is its own."""
    import gc

    import torch

    gc.collect()
    if ck.device.type == "cuda":
        torch.cuda.empty_cache()
