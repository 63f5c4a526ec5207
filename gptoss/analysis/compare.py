"""Compare models trained the same way: the real trainer, the same data, token budget and schedule.

`train_runs` starts `launch/train.py` once per model, one after the other (concurrent runs would share the
cores and distort each other's wall-clock), with identical flags apart from --model and --out. `compare`
then reads the run dirs (or existing ones given with `runs=`) and writes:

- comparison.png: validation loss against tokens seen and against training seconds (two panels);
- comparison.md: final numbers per run (final / best val loss, tokens, seconds, tokens/s, parameters).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gptoss.analysis import AnalysisError
from gptoss.analysis.plots import plot_loss_curves
from gptoss.analysis.runs import Run, load_run
from gptoss.config import param_counts

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"


def run_name(model: str) -> str:
    """Run dir name of a model spec: the preset name, or a config file's stem."""
    return Path(model).stem if model.endswith(".json") else model


def train_command(model: str, data: str | Path, out: str | Path, *, ds_config: str | Path, seq_len: int,
                  eval_every: int, log_every: int, max_steps: int | None = None, tokens: int | None = None,
                  seed: int = 0, extra: Sequence[str] = ()) -> list[str]:
    """The `launch/train.py` command line of one run (one process; the trainer's CPU/GPU defaults apply)."""
    if (max_steps is None) == (tokens is None):
        raise AnalysisError("training needs exactly one budget: --max_steps or --tokens")
    budget = ["--max_steps", str(max_steps)] if max_steps is not None else ["--tokens", str(tokens)]
    return [sys.executable, str(TRAIN_SCRIPT), "--ds_config", str(ds_config), "--model", model, "--data", str(data),
            "--out", str(out), *budget, "--seq_len", str(seq_len), "--eval_every", str(eval_every),
            "--log_every", str(log_every), "--seed", str(seed), "--save_every", "0", *extra]


def _train_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo), as the Makefile sets
    return env


def train_runs(models: Sequence[str], data: str | Path, out_dir: str | Path, *,
               log: Callable[[str], Any] = print, **train_kw: Any) -> list[Path]:
    """Train each model in turn into out_dir/<name>; the trainer's output is appended to <name>/train.log."""
    if not TRAIN_SCRIPT.is_file():
        raise AnalysisError(f"{TRAIN_SCRIPT}: the trainer is missing")
    names = [run_name(m) for m in models]
    if len(set(names)) != len(names):
        raise AnalysisError(f"models {list(models)} give duplicate run names {names}")
    run_dirs = [Path(out_dir) / name for name in names]
    cmds = [train_command(m, data, d, **train_kw) for m, d in zip(models, run_dirs)]  # a bad budget fails here
    for name, run_dir, cmd in zip(names, run_dirs, cmds):
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"training {name}: {' '.join(cmd[1:])}")
        log_path = run_dir / "train.log"
        start = log_path.stat().st_size if log_path.is_file() else 0
        with log_path.open("a") as f:  # appended: a refused start (say, the dir holds a run) keeps the old log
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_train_env())
        if proc.returncode != 0:
            lines = log_path.read_bytes()[start:].decode(errors="replace").strip().splitlines() or ["no output"]
            errors = [line for line in lines if "error" in line.lower()]
            raise AnalysisError(f"training {name} failed (exit {proc.returncode}): {(errors or lines)[-1][:300]} "
                                f"(full log: {log_path})")
    return run_dirs


def summarize(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Final numbers per run; parameters from `param_counts` of the run's model_config.json."""
    rows = []
    for run in runs:
        val, bpb = run.curve("val_loss")[2], run.curve("val_bpb")[2]
        last = run.records[-1]
        total_s = last["elapsed_s"]
        p = param_counts(run.config) if run.config is not None else {}
        rows.append({
            "run": run.name,
            "arch": run.config.arch if run.config is not None else "?",
            "steps": last.get("step"),
            "tokens": last.get("tokens"),
            "final_val_loss": val[-1] if val else None,
            "best_val_loss": min(val) if val else None,
            "final_val_bpb": bpb[-1] if bpb else None,
            "best_val_bpb": min(bpb) if bpb else None,
            "final_train_loss": next((r["loss"] for r in reversed(run.records) if r.get("loss") is not None), None),
            "train_seconds": total_s,
            "tokens_per_s": last.get("tokens", 0) / total_s if total_s else None,
            "params_total": p.get("total"),
            "params_active": p.get("active"),
            "params_active_non_embedding": p.get("non_embedding_active"),
        })
    return rows


# (column header, row key, format: a format spec, or "M" for millions)
COLUMNS = (("run", "run", ""), ("arch", "arch", ""), ("steps", "steps", ","), ("tokens", "tokens", ","),
           ("final val loss", "final_val_loss", ".4f"), ("best val loss", "best_val_loss", ".4f"),
           ("final val bpb", "final_val_bpb", ".4f"), ("best val bpb", "best_val_bpb", ".4f"),
           ("final train loss", "final_train_loss", ".4f"), ("training s", "train_seconds", ",.1f"),
           ("tokens/s", "tokens_per_s", ",.0f"), ("params total", "params_total", "M"),
           ("params active", "params_active", "M"), ("active non-embedding", "params_active_non_embedding", "M"))


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    def cell(v: Any, fmt: str) -> str:
        return "n/a" if v is None else f"{v / 1e6:.2f}M" if fmt == "M" else format(v, fmt)

    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |\n|---|---|" + "---:|" * (len(COLUMNS) - 2) + "\n"
    body = "\n".join("| " + " | ".join(cell(r[key], fmt) for _, key, fmt in COLUMNS) + " |" for r in rows)
    return head + body + ("\n\ntraining s: time in training steps as the trainer logs it (elapsed_s; evaluation and "
                          "checkpointing excluded); tokens/s = tokens / training s; bpb: validation bits per "
                          "UTF-8 byte (n/a for data without a text tokenizer).")


def compare(out_dir: str | Path, *, models: Sequence[str] | None = None, runs: Sequence[str | Path] | None = None,
            data: str | Path | None = None, log: Callable[[str], Any] = print, **train_kw: Any) -> dict[str, Path]:
    """Train `models` (or read existing `runs`), then write comparison.png and comparison.md in out_dir."""
    if (models is None) == (runs is None):
        raise AnalysisError("give either models to train or existing run dirs, not both")
    if models is not None:
        if data is None:
            raise AnalysisError("training needs a prepared data dir (launch/prepare_data.py)")
        runs = train_runs(models, data, out_dir, log=log, **train_kw)
    loaded = [load_run(r) for r in runs or []]
    if not any(run.curve("val_loss")[0] for run in loaded):
        raise AnalysisError("no run has a validation loss (train with --eval_every > 0)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "comparison.png", "md": out / "comparison.md"}
    plot_loss_curves(loaded, paths["png"])
    paths["md"].write_text(comparison_markdown(summarize(loaded)) + "\n")
    return paths
