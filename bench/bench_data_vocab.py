"""`--vocab data` vs `--vocab full`: training speed, memory and loss on real text, and the nano model's size.

    python launch/prepare_data.py --source '../shared/data/tinystories/*.txt' --out /tmp/ts
    python bench/bench_data_vocab.py --data /tmp/ts                      # tiny, 30 steps each, ~5 min on 2 cores

Both runs are launch/train.py with identical flags apart from --vocab (same seed, data order, steps), one after
the other in this one invocation, on the CPU DeepSpeed config. Reported per run: tokens/s (the trainer's, over
the last logging window), peak host RSS (the trainer's mem_rss_gib), the mean training loss of the logged
steps (every 5th) and the validation loss at the end (both per token, over the full 201,088-id vocabulary in both runs).
Then param_counts / flops_per_token of `nano` with the kept set of --data, and an estimate for the whole
TinyStories set: distinct ids of growing prefixes of the data, a power law (Heaps' law) fitted to them and
extrapolated to --full_tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train(vocab: str, data: str, out: Path, steps: int, seq_len: int, model: str) -> dict:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--ds_config", str(REPO / "ds_configs" / "cpu.json"),
           "--model", model, "--data", data, "--out", str(out), "--max_steps", str(steps), "--seq_len", str(seq_len),
           "--eval_every", str(steps), "--eval_batches", "8", "--log_every", "5", "--save_every", "0",
           "--vocab", vocab]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--vocab {vocab} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    last = records[-1]
    return {"tokens_per_s": next(r["tokens_per_s"] for r in reversed(records) if r.get("tokens_per_s")),
            "mem_rss_gib": max(r.get("mem_rss_gib") or 0 for r in records),
            "train_loss_logged": float(np.mean(losses)), "val_loss": last.get("val_loss"),
            "steps": last["step"]}


def distinct_growth(data: Path) -> list[tuple[int, int]]:
    """(tokens, distinct ids) for growing prefixes of train.bin + val.bin."""
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.concatenate([np.fromfile(data / meta["splits"][s]["file"], dtype=meta["dtype"])
                             for s in ("train", "val")])
    return [(n, len(np.unique(tokens[:n]))) for n in (len(tokens) >> k for k in range(5, -1, -1))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/ts")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--full_tokens", type=float, default=4.7e8, help="tokens of the whole TinyStories set")
    a = p.parse_args()

    from gptoss.config import flops_per_token, get_config, param_counts
    from gptoss.data import TokenDataset
    from gptoss.train.plan import with_data_vocabulary

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in ("data", "full"):
            results[vocab] = train(vocab, a.data, Path(tmp) / vocab, a.steps, a.seq_len, a.model)
    d, f = results["data"], results["full"]
    print(f"## {a.model}, {a.steps} steps, seq_len {a.seq_len}, ds_configs/cpu.json, {a.data}\n")
    print("| | --vocab data | --vocab full | data / full |\n|---|---:|---:|---:|")
    for key, fmt in (("tokens_per_s", ",.0f"), ("mem_rss_gib", ".2f"), ("train_loss_logged", ".4f"),
                     ("val_loss", ".4f")):
        print(f"| {key} | {d[key]:{fmt}} | {f[key]:{fmt}} | {d[key] / f[key]:.2f} |")

    train_split = TokenDataset(a.data, "train", seq_len=a.seq_len)
    nano = get_config("nano")
    kept = with_data_vocabulary(nano, train_split)
    growth = distinct_growth(Path(a.data))
    xs, ys = np.log([g[0] for g in growth]), np.log([g[1] for g in growth])
    beta, log_k = np.polyfit(xs, ys, 1)
    est = int(math.exp(log_k) * a.full_tokens ** beta)
    est_cfg = get_config("nano", kept_ids=list(range(est - 1)) + [199999])
    print(f"\n## nano at 4096 context: kept set of {a.data} ({len(kept.kept_ids):,} ids) and an estimate for "
          f"{a.full_tokens:.3g} tokens ({est:,} ids; distinct ~ {math.exp(log_k):.1f} * tokens^{beta:.3f} from "
          f"prefixes {', '.join(f'{n:,}->{k:,}' for n, k in growth)})\n")
    print("| | full vocabulary | data vocabulary (subset) | data / full | estimate (whole set) | estimate / full |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, fn in (("parameters, total", lambda c: param_counts(c)["total"]),
                      ("embedding + unembedding", lambda c: param_counts(c)["embedding"]
                       + param_counts(c)["unembedding"]),
                      ("FLOPs per token, training", lambda c: flops_per_token(c, 4096))):
        full_v, sub_v, est_v = fn(nano), fn(kept), fn(est_cfg)
        print(f"| {label} | {full_v:,.0f} | {sub_v:,.0f} | {sub_v / full_v:.3f} | {est_v:,.0f} | "
              f"{est_v / full_v:.3f} |")


if __name__ == "__main__":
    main()
