"""One training step (forward + backward + AdamW) of our GptOss vs transformers' GptOssForCausalLM.

    python bench/bench_train_step.py                        # nano shape, 4 layers, vocab 8192, T 1024 and 4096
    python bench/bench_train_step.py --layers 8 --seqs 4096
    python bench/bench_train_step.py --breakdown --seqs 4096   # where the time goes, per component

Both sides get the same config (nano: hidden 512, 8/1 heads, 8 experts top-2, I=1024, W=128; vocab and
depth from the flags), the same weights (ours initialised with seed 0 and mapped with `gptoss.hf`), the
same batch and the same loss (cross-entropy + router auxiliary loss), fp32, `torch.optim.AdamW`.
transformers runs with `attn_implementation="eager"` (the only one it supports for gpt_oss that trains on
CPU; `--probe` tries "sdpa" and "flex_attention") and its default experts kernel (`grouped_mm`).
Each side runs in a fresh process; peak memory is that process's peak RSS during the timed steps (weights,
gradients, Adam state and activations). Timings: minimum and median of --repeats steps after --warmup.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

SIDES = {
    "ours": "ours (banded sliding + fused sink-SDPA full)",
    "hf": "transformers eager attention, grouped_mm experts (default)",
    "hf-eager-experts": "transformers eager attention, eager experts loop",
}


def bench_config(args: argparse.Namespace, layers: int | None = None) -> Any:
    from gptoss.config import get_config

    return get_config("nano", vocab_size=args.vocab, num_hidden_layers=layers or args.layers,
                      max_position_embeddings=max(4096, max(args.seqs)))


def build_side(side: str, cfg: Any, attn: str = "eager") -> torch.nn.Module:
    """The model of one side, with the weights of `build_model` under seed 0."""
    from gptoss.model import build_model

    torch.manual_seed(0)
    ours = build_model(cfg)
    if side == "ours":
        return ours
    import transformers

    from gptoss.hf import hf_config, to_hf_state_dict

    kw = {"experts_implementation": "eager"} if side == "hf-eager-experts" else {}  # default: grouped_mm
    hc = transformers.GptOssConfig(**{**hf_config(cfg), "output_router_logits": True})
    hf = transformers.GptOssForCausalLM._from_config(hc, attn_implementation=attn, **kw)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    return hf


def train_step_fn(side: str, model: torch.nn.Module, tokens: torch.Tensor, opt: torch.optim.Optimizer) -> Any:
    """forward + backward + AdamW step, loss = cross-entropy + router auxiliary loss on both sides."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        if side.startswith("ours"):
            out = model(inputs, targets=targets)
            loss = out.loss + out.aux_loss
        else:
            loss = model(inputs, labels=inputs).loss  # shifts inside; adds coef * aux with router logits on
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: build one side, time its steps, measure its peak RSS during them."""
    T = args.seqs[0]
    cfg = bench_config(args)
    model = build_side(args.worker, cfg).train()
    gc.collect()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, T + 1), generator=torch.Generator().manual_seed(1))
    step = train_step_fn(args.worker, model, tokens, opt)
    reset_ok = common.reset_peak_rss()
    rss_before = common.rss_bytes()
    timing = common.time_fn(step, args.repeats, args.warmup)
    return {"side": args.worker, "seq": T, "seconds": timing.seconds, "best": timing.best, "median": timing.median,
            "peak_rss": common.peak_rss_bytes(), "rss_before": rss_before, "peak_is_phase": reset_ok,
            "tokens": args.batch * T, "loss": step()}


def probe_worker(attn: str) -> dict[str, Any]:
    """Does transformers accept `attn` for gpt_oss, and does a CPU training step run with it?"""
    from gptoss.config import get_config

    cfg = get_config("tiny", vocab_size=512)
    try:
        model = build_side("hf", cfg, attn=attn).train()
    except Exception as e:  # noqa: BLE001 (the message is the result)
        return {"attn": attn, "result": f"refused at load: {type(e).__name__}: {str(e).splitlines()[0][:150]}"}
    tokens = torch.randint(0, 512, (1, 65))
    try:
        train_step_fn("hf", model, tokens, torch.optim.AdamW(model.parameters()))()
    except Exception as e:  # noqa: BLE001
        return {"attn": attn, "result": f"loads; training step fails: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:150]}"}
    return {"attn": attn, "result": "loads and trains on CPU"}


def breakdown_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of each component alone (one sliding and one full layer, the MoE, the head),
    timed round-robin so that load from other processes spreads over all components alike."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    T = args.seqs[0]
    cfg = bench_config(args, layers=2)  # layer 0 sliding, layer 1 full
    ours, hf = build_side("ours", cfg), build_side("hf", cfg)
    hf_eager_experts = build_side("hf-eager-experts", cfg)
    x = torch.randn(args.batch, T, cfg.hidden_size, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, T))
    pos = torch.arange(T)
    cos, sin = ours.rotary(pos)
    hf_rope = hf.model.rotary_emb(x, pos[None])
    mask_kw = {"config": hf.config, "inputs_embeds": x, "attention_mask": None, "past_key_values": None}
    hf_masks = {"full_attention": create_causal_mask(**mask_kw),
                "sliding_attention": create_sliding_window_causal_mask(**mask_kw)}
    forwards = {
        "ours attention, sliding layer (banded)": lambda: ours.layers[0].self_attn(x, cos, sin, pos),
        "transformers attention (eager), sliding layer": lambda: hf.model.layers[0].self_attn(
            x, hf_rope, hf_masks["sliding_attention"])[0],
        "ours attention, full layer (fused sink_sdpa_attention)": lambda: ours.layers[1].self_attn(x, cos, sin, pos),
        "transformers attention (eager), full layer": lambda: hf.model.layers[1].self_attn(
            x, hf_rope, hf_masks["full_attention"])[0],
        "ours MoE (per-expert loop)": lambda: ours.layers[0].mlp(x).hidden,
        "transformers MoE (grouped_mm, default)": lambda: hf.model.layers[0].mlp(x)[0],
        "transformers MoE (eager loop)": lambda: hf_eager_experts.model.layers[0].mlp(x)[0],
        "ours final norm + lm_head + chunked CE": lambda: _ours_head_loss(ours, x, targets),
        "transformers final norm + lm_head + CE": lambda: hf.loss_function(
            hf.lm_head(hf.model.norm(x)), targets, cfg.vocab_size),
    }

    def fwd_bwd(fn: Any) -> Any:
        def run() -> None:
            x.grad = None
            fn().float().square().mean().backward()
        return run

    timings = common.interleaved_best({k: fwd_bwd(f) for k, f in forwards.items()}, args.repeats, args.warmup)
    return {"seq": T, "rows": [(name, t.best, t.median) for name, t in timings.items()],
            "load_after": common.load_average()}


def _ours_head_loss(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from gptoss.model.kernels.head_loss import chunked_cross_entropy

    return chunked_cross_entropy(model.norm(x), model.lm_head.weight, targets)


# ---- the parent: run the workers, print the tables ----------------------------------------------------

def worker_args(args: argparse.Namespace, side: str, seq: int) -> list[str]:
    return ["--worker", side, "--seqs", str(seq), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--batch", str(args.batch), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]


def merge_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (side, seq): the timed steps of all rounds pooled, the largest peak RSS."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        key = (r["side"], r["seq"])
        if "error" in r:
            merged.setdefault(key, dict(r))
            continue
        m = merged.get(key)
        if m is None or "error" in m:
            merged[key] = {**r, "seconds": list(r["seconds"]), "loads": [r["load_after"]]}
            continue
        m["seconds"] += r["seconds"]
        m["loads"].append(r["load_after"])
        if r["peak_rss"] > m["peak_rss"]:
            m["peak_rss"], m["rss_before"] = r["peak_rss"], r["rss_before"]
    for m in merged.values():
        if "seconds" in m:
            m["best"], m["median"] = min(m["seconds"]), common.Timing(m["seconds"]).median
    return list(merged.values())


def step_table(results: list[dict[str, Any]], peer: str) -> str:
    rows = []
    by = {(r["side"], r["seq"]): r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            rows.append([f"{SIDES[r['side']]}, T={r['seq']}", "error: " + r["error"], "", "", "", "", "", ""])
            continue
        ref = by.get((peer, r["seq"]))
        speed = f"{ref['best'] / r['best']:.2f}x / {ref['median'] / r['median']:.2f}x" if ref else "n/a"
        mem = f"{r['peak_rss'] / ref['peak_rss']:.2f}x" if ref else "n/a"
        rows.append([f"{SIDES[r['side']]}, T={r['seq']}", f"{r['best']:.2f} / {r['median']:.2f}",
                     f"{r['tokens'] / r['best']:,.0f}", speed, f"{common.gib(r['peak_rss']):.2f}",
                     f"{common.gib(r['peak_rss'] - r['rss_before']):.2f}", mem,
                     ", ".join(f"{x:.1f}" for x in r["loads"])])
    return common.markdown_table(
        ["side", "step s (best / median)", "tokens/s (best)", f"speed vs {peer} (best / median)", "peak RSS GiB",
         "peak - RSS before steps, GiB", f"peak RSS vs {peer}", "load after each worker"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1024,4096", help="sequence lengths, comma-separated (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4,
                   help="layers (nano has 8; 4 keeps the run near 5 min, same sliding/full mix) "
                   "(default: %(default)s)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every side this many times, alternating; timings pooled (default: %(default)s)")
    p.add_argument("--sides", default="ours,hf", help=f"comma-separated, from {', '.join(SIDES)} "
                   "(default: %(default)s)")
    p.add_argument("--peer", default="hf", help="the side ratios are computed against (default: %(default)s)")
    p.add_argument("--breakdown", action="store_true", help="time each component alone instead of full steps")
    p.add_argument("--probe", action="store_true",
                   help="only check which transformers attn_implementation values load and train on CPU")
    common.add_quiet_machine_args(p)
    p.add_argument("--timeout_s", type=float, default=600.0, help="limit per worker process, s")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe_attn", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.seqs = [int(s) for s in args.seqs.split(",")]
    if args.worker == "breakdown":
        common.emit_result(breakdown_worker(args))
        return
    if args.probe_attn:
        common.emit_result(probe_worker(args.probe_attn))
        return
    if args.worker:
        common.emit_result(worker(args))
        return

    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        p.error(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    info = common.machine_info()
    me = Path(__file__)
    print(f"Command: `{common.command_line()}`\n\n{common.machine_line(info)}\n")
    if args.probe:
        rows = []
        for attn in ("eager", "sdpa", "flex_attention"):
            r = common.run_worker(me, ["--probe_attn", attn], args.timeout_s)
            rows.append([f'`attn_implementation="{attn}"`', r.get("result", r.get("error"))])
        print(common.markdown_table(["transformers GptOss (tiny, CPU)", "result"], rows, "ll"))
        return
    if args.breakdown:
        for seq in args.seqs:
            common.wait_until_quiet(args.max_load, args.wait_s)
            r = common.run_worker(me, worker_args(args, "breakdown", seq), args.timeout_s)
            if "error" in r:
                print(f"breakdown T={seq}: error: {r['error']}")
                continue
            print(f"\nForward + backward of one component, batch {args.batch} x T={seq}, {args.repeats} round-robin "
                  f"calls each (1-min load average after: {r['load_after']:.2f}):\n")
            print(common.markdown_table(["component", "best s", "median s"],
                                        [[n, f"{b:.3f}", f"{m:.3f}"] for n, b, m in r["rows"]]))
        return

    print(f"nano shape, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, fp32, AdamW; each side in a "
          f"fresh process {args.rounds} times (alternating), {args.warmup} warm-up + {args.repeats} timed steps "
          f"each.\n")
    runs = []
    for _ in range(args.rounds):  # sides alternate, so a burst of outside load hits both alike
        for seq in args.seqs:
            for side in sides:
                load = common.wait_until_quiet(args.max_load, args.wait_s)
                r = common.run_worker(me, worker_args(args, side, seq), args.timeout_s)
                r.setdefault("side", side)
                r.setdefault("seq", seq)
                r["load_after"] = common.load_average()
                runs.append(r)
                status = r.get("error") or f"median {r['median']:.2f} s, peak {common.gib(r['peak_rss']):.2f} GiB"
                print(f"  {side:>16} T={seq:<5} load {load:.2f} -> {r['load_after']:.2f}: {status}", file=sys.stderr,
                      flush=True)
    results = merge_rounds(runs)
    print(step_table(results, args.peer))
    print(f"\nbest = least disturbed step (the machine may be shared: a worker alone on 2 cores shows a load "
          f"near 2); speed > 1 and peak RSS < 1 favour the row over {args.peer}.")
    if any(math.isnan(r.get("loss", 0.0)) for r in runs):
        print("warning: a side produced a NaN loss")


if __name__ == "__main__":
    main()
