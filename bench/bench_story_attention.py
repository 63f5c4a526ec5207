"""The CPU cost of story-aware attention (attention never crosses <|endoftext|>): each kernel with and without it.

    python bench/bench_story_attention.py                      # T = 1024, 4096, stories of ~200 tokens, ~3 min
    python bench/bench_story_attention.py --seqs 1024 --mean_story 50 --batch 2

Shapes are the nano model's: 8 query heads, 1 kv head, head_dim 64, window 128, fp32, with sinks; forward +
backward, gradients to q, k, v and the sinks. Story lengths are drawn from a geometric distribution with mean
--mean_story (at least 1 token), and each window starts mid-story, as a training window does. Per kind:
- sliding: `banded_sliding_attention` plain vs with the per-row story mask (same band, O(T*W));
- full: the fused `sink_sdpa_attention` over the whole row vs per story (`per_story_attention`: the stories
  padded to the next power of two and batched, one SDPA call per length group);
- model: a 2-layer nano-width GptOss (one sliding, one full layer; vocabulary cut to 8192 so the head does not
  dominate), loss forward + backward, `eot_id=None` vs `eot_id` (includes building the segments).
"segments" is the time to build `Segments` and its SDPA packing, done once per forward for all layers.
Times: both variants of a kind in one fresh process, called round-robin (outside load hits both alike).
"extra MiB": each variant alone in a fresh process, the peak RSS during two calls minus the RSS before them
(inputs excluded).
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

HEADS, KV_HEADS, HEAD_DIM, WINDOW, EOT, MODEL_VOCAB = 8, 1, 64, 128, 0, 8192
KINDS = ("sliding", "full", "model")
LABELS = {"sliding": "sliding layer, banded", "full": "full layer, SDPA with a sink key",
          "model": "2-layer nano-width model, loss"}


def story_ids(batch: int, T: int, mean_story: float, seed: int, vocab: int = MODEL_VOCAB) -> torch.Tensor:
    """Token windows (batch, T): EOT (0) starts each story; lengths geometric with mean `mean_story`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, T), generator=g)
    p = 1.0 / max(mean_story, 1.0)
    for b in range(batch):
        t = int(torch.randint(0, int(mean_story) + 1, (1,), generator=g))  # the window starts mid-story
        while t < T:
            ids[b, t] = EOT
            u = float(torch.rand((), generator=g).clamp(min=1e-12))
            t += max(1, math.ceil(math.log(u) / math.log(1 - p))) if p < 1 else 1
    return ids


def make_call(kind: str, variant: str, T: int, batch: int, mean_story: float) -> Any:
    """A callable running one forward + backward of (kind, variant) at length T."""
    from gptoss.model import Segments

    ids = story_ids(batch, T, mean_story, seed=T)
    if kind == "model":
        from gptoss.config import get_config
        from gptoss.model import build_model

        torch.manual_seed(0)
        model = build_model(get_config("nano", num_hidden_layers=2, vocab_size=MODEL_VOCAB)).train()
        targets = ids.roll(-1, dims=1)
        eot_id = EOT if variant == "stories" else None

        def model_call() -> None:
            model.zero_grad(set_to_none=True)
            out = model(ids, targets=targets, eot_id=eot_id)
            (out.loss + out.aux_loss).backward()

        return model_call
    if kind == "segments":
        return lambda: Segments.from_tokens(ids, EOT).packing()

    from gptoss.model.kernels.attention import banded_sliding_attention, sink_sdpa_attention

    g = torch.Generator().manual_seed(T)
    q = torch.randn(batch, HEADS, T, HEAD_DIM, generator=g).requires_grad_()
    k = torch.randn(batch, KV_HEADS, T, HEAD_DIM, generator=g).requires_grad_()
    v = torch.randn(batch, KV_HEADS, T, HEAD_DIM, generator=g).requires_grad_()
    sinks = torch.randn(HEADS, generator=g).requires_grad_()
    scale = 1.0 / math.sqrt(HEAD_DIM)
    segments = Segments.from_tokens(ids, EOT) if variant == "stories" else None
    if segments is not None:
        segments.packing()  # built once per forward and shared by the layers: timed apart ("segments")

    def kernel_call() -> None:
        for t in (q, k, v, sinks):
            t.grad = None
        if kind == "sliding":
            out = banded_sliding_attention(q, k, v, sinks, scale, WINDOW, segments)
        else:
            out = sink_sdpa_attention(q, k, v, sinks, scale, segments)
        out.square().mean().backward()

    return kernel_call


def worker(mode: str, kind: str, seqs: list[int], batch: int, repeats: int, mean_story: float) -> dict[str, Any]:
    """mode "time": both variants of a kind timed round-robin in this process (a burst of outside load hits
    both alike); mode "memory:<variant>": the peak RSS of one variant's calls, alone in a fresh process."""
    rows = []
    for T in seqs:
        ids = story_ids(batch, T, mean_story, seed=T)
        row: dict[str, Any] = {"seq": T, "n_stories": int((ids == EOT).sum()) + int((ids[:, 0] != EOT).sum())}
        if mode == "time":
            variants = ("stories",) if kind == "segments" else ("plain", "stories")
            calls = {v: make_call(kind, v, T, batch, mean_story) for v in variants}
            for v, timing in common.interleaved_best(calls, repeats, warmup=1).items():
                row[v] = {"best": timing.best, "median": timing.median}
        else:
            variant = mode.split(":")[1]
            call = make_call(kind, variant, T, batch, mean_story)
            common.reset_peak_rss()
            before = common.rss_bytes()
            call()
            call()
            row[variant] = {"extra": common.peak_rss_bytes() - before}
        rows.append(row)
    return {"kind": kind, "rows": rows}


def tables(results: dict[tuple[str, str], dict[int, dict[str, Any]]], kinds: list[str], seqs: list[int],
           batch: int) -> str:
    def cell(r: dict[str, Any] | None) -> str:
        if r is None or "best" not in r or "extra" not in r:
            return "failed"
        return f"{r['best']:.3f} / {r['median']:.3f} / {r['extra'] / 2**20:,.0f}"

    headers = ["kind", "T", "stories", "plain: best s / median s / extra MiB",
               "story-aware: best s / median s / extra MiB", "**story-aware vs plain: time / memory**"]
    rows = []
    for kind in kinds:
        for T in seqs:
            plain, story = results.get((kind, "plain"), {}).get(T), results.get((kind, "stories"), {}).get(T)
            ok = plain and story and all(key in r for r in (plain, story) for key in ("best", "extra"))
            ratio = (f"{story['best'] / plain['best']:.2f}x / {story['extra'] / max(plain['extra'], 1):.2f}x"
                     if ok else "n/a")
            n = story["n_stories"] if story else "?"
            rows.append([LABELS[kind], T, n, cell(plain), cell(story), ratio])
    seg = results.get(("segments", "stories"), {})
    seg_rows = [[T, seg[T]["n_stories"], f"{1e3 * seg[T]['best']:.2f}"] for T in seqs if "best" in seg.get(T, {})]
    return (f"\nForward + backward, batch {batch}, {HEADS}/{KV_HEADS} heads, d={HEAD_DIM}, W={WINDOW}, fp32 "
            f"(best of the timed calls):\n\n" + common.markdown_table(headers, rows)
            + "\n\nBuilding `Segments` and its SDPA packing (once per forward, shared by all layers):\n\n"
            + common.markdown_table(["T", "stories", "ms"], seg_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1024,4096", help="sequence lengths (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--mean_story", type=float, default=200.0, help="mean story length, tokens (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per length (default: %(default)s)")
    p.add_argument("--kinds", default="sliding,full,model", help="from sliding, full, model (default: %(default)s)")
    common.add_quiet_machine_args(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    seqs, kinds = sorted(int(s) for s in args.seqs.split(",")), args.kinds.split(",")
    if any(k not in KINDS for k in kinds):
        p.error(f"--kinds {args.kinds}: choose from {', '.join(KINDS)}")
    if args.worker:  # one kind's timings, or one variant's memory, in this fresh process
        mode, kind = args.worker.split("/")
        return common.emit_result(worker(mode, kind, seqs, args.batch, args.repeats, args.mean_story))
    print(f"Command: `{common.command_line()}`\n\n{common.machine_line(common.machine_info())}")
    results: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    jobs = [("time", k) for k in kinds] + [("time", "segments")]
    jobs += [(f"memory:{v}", k) for k in kinds for v in ("plain", "stories")]
    for mode, kind in jobs:
        common.wait_until_quiet(args.max_load, args.wait_s)
        r = common.run_worker(Path(__file__), ["--worker", f"{mode}/{kind}", "--seqs", args.seqs, "--batch",
                                               str(args.batch), "--repeats", str(args.repeats),
                                               "--mean_story", str(args.mean_story)], timeout_s=900)
        if "error" in r:
            print(f"{kind} {mode}: error: {r['error']}", file=sys.stderr)
            continue
        for row in r["rows"]:
            for variant in ("plain", "stories"):
                if variant in row:
                    by_seq = results.setdefault((kind, variant), {})
                    by_seq.setdefault(row["seq"], {"n_stories": row["n_stories"]}).update(row[variant])
        print(f"  done: {kind} {mode}, load {common.load_average():.2f}", file=sys.stderr, flush=True)
    print(tables(results, kinds, seqs, args.batch))
    print(f"\nStories: geometric lengths, mean {args.mean_story:g} tokens, each window starting mid-story. "
          "Time < 1x: the story mask saves work (full layers attend within each story only).")


if __name__ == "__main__":
    main()
