"""Attention alone, forward + backward, as the sequence grows: our kernels vs transformers' eager GptOss attention.

    python bench/bench_attention.py                          # T = 512 ... 8192, nano heads, ~5 min
    python bench/bench_attention.py --seqs 512,1024,2048 --png /tmp/attention_scaling.png

Shapes are the nano model's: batch 1, 8 query heads, 1 kv head, head_dim 64, window 128, fp32, with sinks;
gradients flow to q, k, v and the sinks. Per layer kind:
- sliding: ours `banded_sliding_attention` (only the band of W keys) vs transformers' `eager_attention_forward`
  with its sliding-window 4D mask (a full T x T score matrix, then masked);
- full: ours `sink_sdpa_attention` (the sink as one extra key, values padded to q/k's head dim and
  `is_causal` with a dummy query, so SDPA's fused flash path runs) vs transformers' eager with its causal mask.
transformers builds its masks once per forward for all layers; here they are built outside the timing.

Each (kernel, layer kind) runs in one fresh process over increasing T; before each T the peak RSS is reset,
and "extra MiB" is the peak RSS during the calls minus the RSS before them (inputs excluded). A kernel
stops growing T when the next size is predicted (4x time and memory per doubling) to exceed --max_call_s
or the memory available; the table says so.
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

KERNELS = {
    ("ours", "sliding"): "ours banded_sliding_attention",
    ("ours", "full"): "ours sink_sdpa_attention",
    ("hf", "sliding"): "transformers eager, sliding mask",
    ("hf", "full"): "transformers eager, causal mask",
}
HEADS, KV_HEADS, HEAD_DIM, WINDOW = 8, 1, 64, 128


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**40


def make_kernel(impl: str, kind: str, T: int, batch: int) -> Any:
    """A callable (q, k, v, sinks) -> output (B, heads, T, d) for one kernel at one length."""
    scale = 1.0 / math.sqrt(HEAD_DIM)
    window = WINDOW if kind == "sliding" else None
    if impl == "ours":
        from gptoss.model.kernels.attention import banded_sliding_attention, sink_sdpa_attention

        if window:
            return lambda q, k, v, s: banded_sliding_attention(q, k, v, s, scale, WINDOW)
        return lambda q, k, v, s: sink_sdpa_attention(q, k, v, s, scale)
    import transformers
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    config = transformers.GptOssConfig(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                       sliding_window=WINDOW, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2)
    config._attn_implementation = "eager"
    embeds = torch.empty(batch, T, 1)
    make_mask = create_sliding_window_causal_mask if window else create_causal_mask
    mask = make_mask(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None)

    class Module(torch.nn.Module):  # what eager_attention_forward reads from GptOssAttention
        num_key_value_groups = HEADS // KV_HEADS

    module = Module().train()

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        module.sinks = s
        out, _ = eager_attention_forward(module, q, k, v, mask, scaling=scale, dropout=0.0)
        return out  # (B, T, heads, d): layout differs, the work does not

    return run


def measure(impl: str, kind: str, T: int, batch: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Time one kernel at one length; peak RSS above the RSS before the calls (inputs excluded)."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(batch, HEADS, T, HEAD_DIM, generator=g).requires_grad_()
    k = torch.randn(batch, KV_HEADS, T, HEAD_DIM, generator=g).requires_grad_()
    v = torch.randn(batch, KV_HEADS, T, HEAD_DIM, generator=g).requires_grad_()
    sinks = torch.randn(HEADS, generator=g).requires_grad_()
    fn = make_kernel(impl, kind, T, batch)

    def call() -> None:
        for t in (q, k, v, sinks):
            t.grad = None
        fn(q, k, v, sinks).square().mean().backward()

    common.reset_peak_rss()
    before = common.rss_bytes()
    timing = common.time_fn(call, repeats, warmup)
    return {"seq": T, "best": timing.best, "median": timing.median, "extra": common.peak_rss_bytes() - before}


def worker(impl: str, kind: str, seqs: list[int], batch: int, repeats: int, max_call_s: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for i, T in enumerate(seqs):
        if rows:  # predict the next size from the last one: T^2 kernels 4x per doubling, linear ones 2x
            grow = (T / rows[-1]["seq"]) ** (1 if (impl == "ours" and kind == "sliding") else 2)
            t_next, m_next = rows[-1]["best"] * grow, rows[-1]["extra"] * grow
            if t_next * (repeats + 1) > max_call_s or m_next > 0.8 * available_bytes():
                rows.append({"seq": T, "skipped": f"predicted {t_next:.0f} s per call, {common.gib(m_next):.1f} GiB"})
                break
        rows.append(measure(impl, kind, T, batch, repeats, warmup=1 if i == 0 else 0))
    return {"impl": impl, "kind": kind, "rows": rows}


def merge_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kernel, kind) and T: the best time over rounds, the largest memory; 'stopped' only if never run."""
    merged: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in runs:
        rows = merged.setdefault((r["impl"], r["kind"]), {})
        for row in r["rows"]:
            old = rows.get(row["seq"])
            if old is None or "skipped" in old:
                rows[row["seq"]] = dict(row)
            elif "best" in row:
                old["best"] = min(old["best"], row["best"])
                old["extra"] = max(old["extra"], row["extra"])
    return [{"impl": i, "kind": k, "rows": [rows[t] for t in sorted(rows)]} for (i, k), rows in merged.items()]


def tables(results: list[dict[str, Any]], seqs: list[int]) -> str:
    """Per layer kind: seconds, µs per token and extra MiB per kernel, and ours vs transformers."""
    by = {(r["impl"], r["kind"]): {row["seq"]: row for row in r.get("rows", [])} for r in results}
    out = []
    for kind in ("sliding", "full"):
        impls = [i for i in ("ours", "hf") if (i, kind) in by]
        headers = ["T"] + [f"{KERNELS[(i, kind)]}: s / µs per token / extra MiB" for i in impls]
        headers += [f"{i} vs transformers: speed / memory" for i in impls if i != "hf"]
        rows = []
        for T in seqs:
            row: list[str] = [str(T)]
            for impl in impls:
                r = by[(impl, kind)].get(T)
                if r is None:
                    row.append("not run")
                elif "skipped" in r:
                    row.append(f"stopped: {r['skipped']}")
                else:
                    row.append(f"{r['best']:.3f} / {1e6 * r['best'] / T:.0f} / {r['extra'] / 2**20:,.0f}")
            hf = by.get(("hf", kind), {}).get(T)
            for impl in impls:
                if impl == "hf":
                    continue
                r = by[(impl, kind)].get(T)
                if r and hf and "best" in r and "best" in hf:
                    row.append(f"{hf['best'] / r['best']:.1f}x / {r['extra'] / max(hf['extra'], 1):.2f}x")
                else:
                    row.append("n/a")
            rows.append(row)
        out.append(f"\n{kind} layers (batch 1, {HEADS}/{KV_HEADS} heads, d={HEAD_DIM}, W={WINDOW}, fwd+bwd, "
                   f"best of the timed calls):\n\n" + common.markdown_table(headers, rows))
    return "\n".join(out)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        pts = [(row["seq"], row["best"]) for row in r["rows"] if "best" in row]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=KERNELS[(r["impl"], r["kind"])])
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="seconds (fwd + bwd)",
           title="Attention with sinks on CPU: time vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="512,1024,2048,4096,8192", help="sequence lengths (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per length (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every kernel this many times, alternating; best time kept (default: %(default)s)")
    p.add_argument("--kernels", default="ours,hf", help="from ours, hf (default: %(default)s)")
    p.add_argument("--max_call_s", type=float, default=60.0,
                   help="stop a kernel before a length predicted to need more than this for all its calls")
    common.add_quiet_machine_args(p)
    p.add_argument("--png", default=None, help="also save a log-log plot of time vs T here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    seqs = sorted(int(s) for s in args.seqs.split(","))
    if args.worker:
        impl, kind = args.worker.split(":")
        common.emit_result(worker(impl, kind, seqs, args.batch, args.repeats, args.max_call_s))
        return
    chosen = args.kernels.split(",")
    if any(k not in ("ours", "hf") for k in chosen):
        p.error(f"--kernels {args.kernels}: choose from ours, hf")
    print(f"Command: `{common.command_line()}`\n\n{common.machine_line(common.machine_info())}")
    runs = []
    for _ in range(args.rounds):  # kernels alternate, so a burst of outside load hits all alike
        for impl, kind in KERNELS:
            if impl not in chosen:
                continue
            common.wait_until_quiet(args.max_load, args.wait_s)
            r = common.run_worker(Path(__file__), ["--worker", f"{impl}:{kind}", "--seqs", args.seqs, "--batch",
                                                   str(args.batch), "--repeats", str(args.repeats),
                                                   "--max_call_s", str(args.max_call_s)], timeout_s=900)
            if "error" in r:
                r = {"impl": impl, "kind": kind, "rows": [], "error": r["error"]}
                print(f"{KERNELS[(impl, kind)]}: error: {r['error']}", file=sys.stderr)
            runs.append(r)
            print(f"  done: {KERNELS[(impl, kind)]}, load {common.load_average():.2f}", file=sys.stderr, flush=True)
    results = merge_rounds(runs)
    print(tables(results, seqs))
    print("\nµs per token constant in T = linear scaling; speed > 1 and memory < 1 favour ours.")
    if args.png:
        plot(results, args.png)
        print(f"\nPlot: {args.png}")


if __name__ == "__main__":
    main()
