"""gpu_check's decode stage: our sampler's tokens/s against transformers' `generate` on the same export, greedy,
eager step and compiled step (torch.compile mode "reduce-overhead": CUDA graphs), each with its tokens compared.

The model has random weights (the preset of the run's sizes, seed 0), is written with `gptoss.export.save_model`
and loaded back by both sides in fp32 (transformers with eager attention: its sdpa path has no sinks), as in
bench/bench_generate.py. Tokens/s counts new tokens over wall time including the prompt pass, best of 3 after a
warm-up (the compiled step's first call compiles and records; its time is reported apart). A dry run does the
same on CPU at toy size, once each, compiled with the eager backend (what it proves is that the step traces whole).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import common
from gpu_check_harness import Check, free_memory, sync

PROMPT_LEN, BATCH = 16, 1


def _best(ck: Check, fn: Callable[[], list[list[int]]], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(ck)
        t0 = time.perf_counter()
        fn()
        sync(ck)
        best = min(best, time.perf_counter() - t0)
    return best


def _first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    for row_a, row_b in zip(a, b):
        for i, (x, y) in enumerate(zip(row_a, row_b)):
            if x != y:
                return i
    return None


def decode_speed(ck: Check) -> None:
    dry = ck.device.type != "cuda"
    new_tokens, repeats = (8, 1) if dry else (128, 3)
    backend = os.environ.get("GPTOSS_COMPILE_BACKEND")
    if dry:
        os.environ["GPTOSS_COMPILE_BACKEND"] = "eager"
    try:
        _measure(ck, new_tokens, repeats)
    finally:
        if backend is None:
            os.environ.pop("GPTOSS_COMPILE_BACKEND", None)
        else:
            os.environ["GPTOSS_COMPILE_BACKEND"] = backend
    free_memory(ck)


def _measure(ck: Check, new_tokens: int, repeats: int) -> None:
    import torch

    from gptoss.config import get_config
    from gptoss.export import save_model
    from gptoss.generate import generate_batch, load_model
    from gptoss.model import build_model

    dry = ck.device.type != "cuda"
    cfg = get_config(ck.sizes.model, **({"vocab_size": 512} if dry else {}))
    torch.manual_seed(0)
    path = save_model(build_model(cfg), ck.work / "decode-export")
    ours = load_model(path, ck.device, "fp32")
    hf = common.hf_causal_lm(path, ck.device)
    prompts = torch.randint(0, cfg.vocab_size, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    theirs = common.hf_greedy(hf, prompts, new_tokens)
    hf_s = _best(ck, lambda: common.hf_greedy(hf, prompts, new_tokens), repeats)
    tokens = BATCH * new_tokens
    shape = (f"{ck.sizes.model} ({cfg.vocab_size} ids), fp32, greedy, batch {BATCH}, prompt {PROMPT_LEN}, "
             f"{new_tokens} new tokens, best of {repeats}; transformers generate {tokens / hf_s:.1f} tokens/s")
    for label, compiled in (("eager", False), ("compiled", True)):
        run = lambda c=compiled: generate_batch(ours, prompts, new_tokens, temperature=0, compile=c)  # noqa: E731
        t0 = time.perf_counter()
        mine = run()
        first_s = time.perf_counter() - t0
        s = _best(ck, run, repeats)
        diff = _first_difference(mine, theirs)
        result = (f"{tokens / s:.1f} tokens/s, {hf_s / s:.2f}x transformers" if diff is None else
                  f"FAIL: tokens differ from transformers' from position {diff}")
        extra = (f"; first call (compile + graph capture) {first_s:.1f} s, mode "
                 f"{'reduce-overhead (CUDA graphs)' if not dry else 'dry run: eager backend'}"
                 if compiled else "")
        ck.add(f"decode {label} step vs transformers", result, f"{shape}; {1000 * s / new_tokens:.2f} ms/step{extra}")

