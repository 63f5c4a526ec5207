"""`--vocab data` vs `--vocab full`: training speed, memory and loss per token on real text, sampling speed,
and the nano model's size, all in one invocation that prints one markdown block.

    python launch/prepare_data.py --source '../shared/data/tinystories/*.txt' --out /tmp/ts
    python bench/bench_data_vocab.py --data /tmp/ts         # ~17 min on 2 quiet cores (10 of them: tiny, full)
    python bench/bench_data_vocab.py --data /tmp/ts --steps 3 --eval_every 3 --nano_steps 0 --sample_tokens 8 \
        --plot /tmp/dv.png                                           # smoke test, ~1.5 min

1. Training, tiny (--model, --steps at --seq_len) and nano at reduced depth (the nano preset with
   --nano_layers layers, --nano_steps at --nano_seq_len): launch/train.py with identical flags apart from
   --vocab (same seed, data order, steps), one after the other, on ds_configs/cpu.json. tokens/s: training steps
   only (evaluations excluded), from the first logging window's end to the last step, so the warm-up window
   is left out; memory: the trainer's peak RSS (ru_maxrss, the whole process lifetime).
2. Loss per token, tiny: training loss (mean of the logged steps in the last quarter), validation loss and
   bits per byte at every --eval_every (--eval_batches fixed windows), both runs over the full 201,088-id
   vocabulary; the curves go to --plot (training loss faint, validation loss as points).
3. Sampling from the tiny --vocab data run: ours on the run dir (gptoss.generate, data-vocabulary rows) and on
   its export (launch/export.py's `export`, 201,088 rows), transformers' `generate` on the export; same prompt,
   greedy, exactly --sample_tokens new tokens, no stop id (bench/common.py's decoders, as bench_generate.py).
   Ids and text (tiktoken for ours, the export's AutoTokenizer for transformers) are compared with transformers'.
4. nano at 4096 context: param_counts / flops_per_token with the kept set of --data, and an estimate for the
   whole TinyStories set: distinct ids of growing prefixes, a power law (Heaps' law) fitted and extrapolated
   to --full_tokens.
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
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

REPO = common.REPO
VOCABS = ("data", "full")


# ---- training runs ---------------------------------------------------------------------------------

def steady_tokens_per_s(records: list[dict[str, Any]]) -> float:
    """Training tokens/s from the end of the first logging window (warm-up: first steps, lazy allocations)
    to the last logged step; the trainer's elapsed_s counts training steps only. One window: its own rate."""
    logged = [r for r in records if r.get("tokens_per_s")]
    if not logged:
        raise ValueError("no record with tokens_per_s")
    first, last = logged[0], logged[-1]
    if last["elapsed_s"] <= first["elapsed_s"]:
        return float(first["tokens_per_s"])
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers a run contributes to the tables (see the module docstring)."""
    steps = records[-1]["step"]
    tail = [r["loss"] for r in records if r.get("loss") is not None and r["step"] > 0.75 * steps]
    vals = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in records if r.get("val_loss") is not None]
    return {"steps": steps, "tokens_per_s": steady_tokens_per_s(records),
            "mem_rss_gib": max(r.get("mem_rss_gib") or 0.0 for r in records),
            "train_loss_tail": float(np.mean(tail)) if tail else math.nan,
            "val": vals, "val_loss": vals[-1][1] if vals else math.nan,
            "val_bpb": (vals[-1][2] if vals and vals[-1][2] is not None else math.nan)}


def train(model: str, vocab: str, out: Path, a: argparse.Namespace, steps: int, seq_len: int,
          eval_every: int) -> dict[str, Any]:
    """One launch/train.py run (after a wait for a quiet machine); its summary, or SystemExit with stderr."""
    from gptoss.analysis.compare import train_command

    cmd = train_command(model, a.data, out, ds_config=REPO / "ds_configs" / "cpu.json", seq_len=seq_len,
                        eval_every=eval_every, log_every=max(1, min(5, steps // 2)), max_steps=steps,
                        extra=("--eval_batches", str(a.eval_batches), "--vocab", vocab))
    common.wait_until_quiet(a.max_load, a.wait_s)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.is_dir():  # the trainer's own output next to its metrics, for --keep
        (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name} (--vocab {vocab}) failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    from gptoss.analysis.runs import read_metrics

    return summarize(read_metrics(out))


# ---- sampling --------------------------------------------------------------------------------------

def sampling(run: Path, work: Path, a: argparse.Namespace) -> tuple[list[list[Any]], str]:
    """Rows of the sampling table and the greedy text, from a --vocab data run dir and its export."""
    import torch
    import transformers

    from gptoss.export import export
    from gptoss.generate import generate_batch, load_model
    from gptoss.tokenizer import EOT_ID, decode, encode

    exported = export(run, work / "export", progress=False)
    on_run, on_export = load_model(run, "cpu", "fp32"), load_model(exported, "cpu", "fp32")
    hf = common.hf_causal_lm(exported, "cpu")
    prompts = torch.tensor([[EOT_ID, *encode(a.prompt)]])
    n = a.sample_tokens
    runs = {f"ours on the run dir ({on_run.config.trained_vocab_size:,} vocab rows)":
            lambda: generate_batch(on_run, prompts, n, temperature=0),
            f"ours on the export ({on_export.config.trained_vocab_size:,} vocab rows)":
            lambda: generate_batch(on_export, prompts, n, temperature=0),
            "transformers generate on the export": lambda: common.hf_greedy(hf, prompts, n)}
    timed = common.time_decoders(runs, a.repeats, a.max_load, a.wait_s)
    t_hf, reference = timed["transformers generate on the export"]
    hf_text = transformers.AutoTokenizer.from_pretrained(exported).decode(reference[0])
    rows = []
    for label, (t, ids) in timed.items():
        rows.append([label, f"{n / t.best:,.1f} ({n / t.median:,.1f})", f"{t_hf.best / t.best:.2f}",
                     "yes" if ids == reference else "NO", "yes" if decode(ids[0]) == hf_text else "NO"])
    return rows, a.prompt + hf_text


# ---- nano's size -------------------------------------------------------------------------------------

def distinct_growth(data: Path) -> list[tuple[int, int]]:
    """(tokens, distinct ids) for growing prefixes of train.bin + val.bin."""
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.concatenate([np.fromfile(data / meta["splits"][s]["file"], dtype=meta["dtype"])
                             for s in ("train", "val")])
    return [(n, len(np.unique(tokens[:n]))) for n in (len(tokens) >> k for k in range(5, -1, -1))]


def nano_size(a: argparse.Namespace) -> str:
    from gptoss.config import flops_per_token, get_config, param_counts
    from gptoss.data import TokenDataset
    from gptoss.train.plan import with_data_vocabulary

    nano = get_config("nano")
    kept = with_data_vocabulary(nano, TokenDataset(a.data, "train", seq_len=64))
    growth = distinct_growth(Path(a.data))
    beta, log_k = np.polyfit(np.log([g[0] for g in growth]), np.log([g[1] for g in growth]), 1)
    est = int(math.exp(log_k) * a.full_tokens ** beta)
    est_cfg = get_config("nano", kept_ids=list(range(est - 1)) + [199999])
    lines = [f"### nano at 4096 context: kept set of {a.data} ({len(kept.kept_ids):,} ids) and an estimate for "
             f"{a.full_tokens:.3g} tokens ({est:,} ids; distinct ~ {math.exp(log_k):.1f} * tokens^{beta:.3f} from "
             f"prefixes {', '.join(f'{n:,}->{k:,}' for n, k in growth)})\n"]
    rows = []
    for label, fn in (("parameters, total", lambda c: param_counts(c)["total"]),
                      ("embedding + unembedding", lambda c: param_counts(c)["embedding"]
                       + param_counts(c)["unembedding"]),
                      ("FLOPs per token, training", lambda c: flops_per_token(c, 4096))):
        full_v, sub_v, est_v = fn(nano), fn(kept), fn(est_cfg)
        rows.append([label, f"{full_v:,.0f}", f"{sub_v:,.0f}", f"{sub_v / full_v:.3f}", f"{est_v:,.0f}",
                     f"{est_v / full_v:.3f}"])
    lines.append(common.markdown_table(["", "full vocabulary", "data vocabulary (subset)", "data / full",
                                        "estimate (whole set)", "estimate / full"], rows))
    return "\n".join(lines)


# ---- report ------------------------------------------------------------------------------------------

def ratio(d: float, f: float, fmt: str = ".2f") -> str:
    return f"{d / f:{fmt}}" if f and not (math.isnan(d) or math.isnan(f)) else "n/a"


def speed_table(runs: dict[str, dict[str, dict[str, Any]]], shapes: dict[str, str]) -> str:
    rows = []
    for name, r in runs.items():
        d, f = r["data"], r["full"]
        rows.append([f"{name} ({shapes[name]})", f"{d['tokens_per_s']:,.0f}", f"{f['tokens_per_s']:,.0f}",
                     ratio(d["tokens_per_s"], f["tokens_per_s"]), f"{d['mem_rss_gib']:.2f}",
                     f"{f['mem_rss_gib']:.2f}", ratio(d["mem_rss_gib"], f["mem_rss_gib"])])
    return common.markdown_table(["model", "tokens/s, data", "tokens/s, full", "data / full", "peak RSS GiB, data",
                                  "peak RSS GiB, full", "data / full"], rows)


def loss_tables(d: dict[str, Any], f: dict[str, Any]) -> str:
    rows = [[label, f"{d[k]:.4f}", f"{f[k]:.4f}", ratio(d[k], f[k], ".3f")]
            for label, k in (("train loss per token, mean of the last quarter's logged steps", "train_loss_tail"),
                             (f"val loss per token, step {d['steps']}", "val_loss"),
                             (f"val bits per byte, step {d['steps']}", "val_bpb"))]
    out = common.markdown_table(["", "--vocab data", "--vocab full", "data / full"], rows)
    fv = {step: loss for step, loss, _ in f["val"]}
    points = [[str(step), f"{loss:.4f}", f"{fv[step]:.4f}" if step in fv else "n/a",
               f"{loss - fv[step]:+.4f}" if step in fv else "n/a"] for step, loss, _ in d["val"]]
    return out + "\n\nValidation loss per token at each evaluation:\n\n" + common.markdown_table(
        ["step", "--vocab data", "--vocab full", "data - full"], points)


INT_FLAGS = (  # flag, default, smallest value, help
    ("--steps", 200, 2, "training steps of each --model run"),
    ("--seq_len", 256, 2, "--model's sequence length"),
    ("--eval_every", 25, 1, "--model's evaluation interval, steps"),
    ("--eval_batches", 8, 1, "micro-batches per evaluation"),
    ("--nano_layers", 2, 1, "layers of the reduced nano"),
    ("--nano_steps", 6, 0, "training steps of each reduced-nano run (0: skip them, else >= 2)"),
    ("--nano_seq_len", 128, 2, "the reduced nano's sequence length"),
    ("--sample_tokens", 128, 0, "new tokens per sampling run; 0: skip sampling"),
    ("--repeats", 3, 1, "timed sampling runs after a warm-up"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/ts", help="prepared data dir (default: %(default)s)")
    p.add_argument("--model", default="tiny", help="model of the loss comparison and sampling (default: %(default)s)")
    for flag, default, _, what in INT_FLAGS:
        p.add_argument(flag, type=int, default=default, help=what + " (default: %(default)s)")
    p.add_argument("--prompt", default="Once upon a time", help="sampling prompt (default: %(default)r)")
    p.add_argument("--plot", default=str(REPO / "bench" / "results" / "data-vocab-tiny-loss.png"),
                   help="PNG of both loss curves (default: %(default)s)")
    p.add_argument("--keep", default=None, help="keep the run dirs here (default: a temporary dir)")
    p.add_argument("--full_tokens", type=float, default=4.7e8, help="tokens of the whole TinyStories set")
    common.add_quiet_machine_args(p)
    a = p.parse_args(argv)
    for flag, _, low, _ in INT_FLAGS:
        if getattr(a, flag[2:]) < low:
            p.error(f"{flag} {getattr(a, flag[2:])}: expected an integer >= {low}")
    if a.nano_steps == 1:
        p.error("--nano_steps 1: expected 0 (skip) or >= 2 (a warm-up window and a measured one)")
    if not (Path(a.data) / "meta.json").is_file():
        p.error(f"--data {a.data}: no meta.json (prepare it with launch/prepare_data.py)")
    from gptoss.config import get_config
    from gptoss.tokenizer import encode

    limit = get_config(a.model).max_position_embeddings
    if a.sample_tokens and len(encode(a.prompt)) + 1 + a.sample_tokens > limit:
        p.error(f"--prompt and --sample_tokens {a.sample_tokens}: {len(encode(a.prompt)) + 1} prompt tokens + "
                f"new tokens exceed --model {a.model}'s {limit} positions")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from gptoss.analysis.plots import plot_loss_curves
    from gptoss.analysis.runs import load_run
    from gptoss.config import get_config

    header = common.machine_line(common.machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs: dict[str, dict[str, dict[str, Any]]] = {a.model: {}}
        shapes = {a.model: f"seq_len {a.seq_len}, {a.steps} steps"}
        for vocab in VOCABS:
            runs[a.model][vocab] = train(a.model, vocab, work / f"{a.model}-vocab-{vocab}", a, a.steps, a.seq_len,
                                         a.eval_every)
        if a.nano_steps:
            nano = f"nano-L{a.nano_layers}"
            get_config("nano", num_hidden_layers=a.nano_layers).save(work / f"{nano}.json")
            shapes[nano] = f"nano with {a.nano_layers} layers, seq_len {a.nano_seq_len}, {a.nano_steps} steps"
            runs[nano] = {v: train(str(work / f"{nano}.json"), v, work / f"{nano}-vocab-{v}", a, a.nano_steps,
                                   a.nano_seq_len, 0) for v in VOCABS}
        plot = plot_loss_curves([load_run(work / f"{a.model}-vocab-{v}") for v in VOCABS], a.plot,
                                title=f"{a.model} on {a.data}: --vocab data vs --vocab full, same steps and data")
        sample = sampling(work / f"{a.model}-vocab-data", work, a) if a.sample_tokens else None

    d, f = runs[a.model]["data"], runs[a.model]["full"]
    print(f"Command: `{common.command_line()}`\n\n{header}\n")
    print(f"### Training speed and memory: launch/train.py, ds_configs/cpu.json (8 sequences per step, fp32, ZeRO-2), "
          f"{a.data}, same seed and data order; tokens/s after the first logging window, evaluations excluded\n")
    print(speed_table(runs, shapes))
    print(f"\n### Loss per token, {a.model}: {a.steps} steps at seq_len {a.seq_len}, {a.eval_batches} val "
          f"micro-batches every {a.eval_every} steps, full-vocabulary cross-entropy in both runs\n")
    print(loss_tables(d, f))
    try:
        shown = Path(plot).resolve().relative_to(REPO)
    except ValueError:
        shown = Path(plot)
    print(f"\nPlot: `{shown}` (training loss faint, validation loss as points; by tokens and by training seconds)")
    if sample is not None:
        rows, text = sample
        print(f"\n### Sampling, {a.model} --vocab data run: greedy, prompt {a.prompt!r} after <|endoftext|>, "
              f"{a.sample_tokens} new tokens, fp32 CPU; best of {a.repeats} (median)\n")
        print(common.markdown_table(["implementation", "new tokens/s", "speed / transformers",
                                     "same ids as transformers", "same text"], rows, align="lrrll"))
        print(f"\nGreedy text: {json.dumps(text[:300])}{' ...' if len(text) > 300 else ''}")
    print()
    print(nano_size(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
