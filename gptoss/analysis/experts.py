"""Tokens per expert per layer: over training from a run's metrics, or now by running a model on text.

The trainer logs `expert_load` on every logged step: per layer, each expert's share of that step's
token -> expert assignments (all ranks, sums to 1). A balanced router gives 1/E everywhere; a collapsed
one puts most of the mass on a few experts, which wastes parameters (the aux loss exists to prevent it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptoss.analysis import AnalysisError
from gptoss.analysis.loading import check_token_ids, encode, load_model
from gptoss.analysis.plots import plot_expert_counts, plot_expert_load
from gptoss.analysis.runs import read_metrics
from gptoss.data.synthetic import generate_corpus


def expert_load_from_metrics(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps (n,), load (n, layers, experts)) from the records that carry `expert_load`."""
    rows = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
    if not rows:
        raise AnalysisError("no `expert_load` in these metrics (a GPT-2 run has no experts; the trainer logs it "
                            "on logged steps of MoE models)")
    shapes = {np.shape(load) for _, load in rows}
    if len(shapes) != 1:
        raise AnalysisError(f"expert_load changes shape across records: {sorted(shapes)}")
    return np.array([s for s, _ in rows]), np.array([load for _, load in rows], dtype=np.float64)


@torch.no_grad()
def expert_counts_from_model(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Assignments per expert per layer (layers, E), summed over forward passes of the given token batches.

    Uses the `expert_counts` the model's forward returns (this rank's experts; ep_size 1 holds them all).
    """
    was_training = model.training
    model.eval()
    total = None
    try:
        for ids in batches:
            ids = ids.to(next(model.parameters()).device)
            counts = model(ids).expert_counts
            if counts is None:
                raise AnalysisError(f"{type(model).__name__} returns no expert_counts (not a mixture-of-experts "
                                    "model)")
            total = counts.double().cpu() if total is None else total + counts.double().cpu()
    finally:
        model.train(was_training)
    return total


def token_batches(ids: list[int] | torch.Tensor, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Consecutive windows of `seq_len` tokens, one (1, seq_len) batch each, at most `max_batches` of them."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = min(len(ids) // seq_len, max_batches)
    if n == 0:
        raise AnalysisError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return list(ids[: n * seq_len].view(n, 1, seq_len))


def imbalance(load: np.ndarray) -> np.ndarray:
    """max share x E per layer (1.0 = perfectly balanced, E = everything on one expert); load (..., E)."""
    return load.max(-1) * load.shape[-1] / np.maximum(load.sum(-1), 1e-12)


def imbalance_markdown(load: np.ndarray, columns: dict[str, int]) -> str:
    """Per layer, max share x E at the chosen record indices (1.0 = balanced)."""
    head = "| layer | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    rows = [f"| {layer} | " + " | ".join(f"{imbalance(load[i, layer]):.2f}" for i in columns.values()) + " |"
            for layer in range(load.shape[1])]
    return head + "\n".join(rows) + "\n\nmax share x experts: 1.00 = balanced, E = all tokens on one expert."


def expert_usage_from_run(run_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """expert_usage_training.png (per-layer heatmaps over steps), .md (imbalance, first vs last step) and
    .json (the logged steps and loads)."""
    steps, load = expert_load_from_metrics(read_metrics(run_dir))
    out = Path(out_dir)
    paths = {kind: out / f"expert_usage_training.{kind}" for kind in ("png", "md", "json")}
    plot_expert_load(steps, load, paths["png"], title=f"Expert load over training: {Path(run_dir).name}")
    cols = {f"step {steps[0]}": 0, f"step {steps[-1]}": len(steps) - 1}
    paths["md"].write_text(imbalance_markdown(load, cols) + "\n")
    paths["json"].write_text(json.dumps({"run": str(run_dir), "steps": steps.tolist(),
                                         "expert_load": load.tolist()}) + "\n")
    return paths


def expert_usage_from_model(model: nn.Module, batches: Iterable[torch.Tensor], out_dir: str | Path,
                            name: str = "model") -> dict[str, Path]:
    """expert_usage_model.png (layers x experts shares), .md (imbalance) and .json (the counts) from running
    the model on the batches."""
    batches = list(batches)
    counts = expert_counts_from_model(model, batches).numpy()
    tokens = sum(b.numel() for b in batches)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    out = Path(out_dir)
    paths = {kind: out / f"expert_usage_model.{kind}" for kind in ("png", "md", "json")}
    plot_expert_counts(counts, paths["png"], title=f"Tokens per expert: {name} "
                                                   f"({int(counts[0].sum()):,} assignments per layer)")
    share = counts / np.maximum(counts.sum(-1, keepdims=True), 1e-12)
    paths["md"].write_text(f"{tokens:,} tokens, {top_k} experts per token: {int(counts[0].sum()):,} assignments "
                           "per layer.\n\n" + imbalance_markdown(share[None], {name: 0}) + "\n")
    paths["json"].write_text(json.dumps({"model": name, "tokens": tokens, "experts_per_token": top_k,
                                         "counts": counts.astype(np.int64).tolist()}) + "\n")
    return paths


def expert_usage(out_dir: str | Path, *, run: str | Path | None = None, model: str | Path | None = None,
                 text: str | Path | None = None, token_ids: list[int] | None = None, seq_len: int = 256,
                 max_batches: int = 8) -> dict[str, Path]:
    """The `analyze.py expert-usage` command: from a run's metrics, or a model run on text (default: 20
    stories of gptoss's own grammar, `gptoss.data.synthetic`) or on given token ids (a small-vocabulary model).

    Windows of `seq_len` tokens, at most `max_batches` of them; input shorter than one window runs as one.
    """
    if run is not None:  # launch/analyze.py makes --run and --model, --text and --token_ids exclusive
        if text is not None or token_ids is not None:
            raise AnalysisError("--text and --token_ids go with --model (a run's metrics need no input)")
        return expert_usage_from_run(run, out_dir)
    if seq_len < 1 or max_batches < 1:
        raise AnalysisError(f"--seq_len {seq_len} --max_batches {max_batches}: both must be >= 1")
    net = load_model(model)
    if token_ids is not None:
        ids = check_token_ids(token_ids, net.config.vocab_size)
    elif text is None:  # a few stories of gptoss's own grammar
        ids = encode("\n".join(s.text for s in generate_corpus(20, seed=0)), net.config.vocab_size)
    elif not Path(text).is_file():
        raise AnalysisError(f"--text {text}: no such file")
    else:
        ids = encode(Path(text).read_text(encoding="utf-8"), net.config.vocab_size)
    batches = token_batches(ids, min(seq_len, len(ids)), max_batches)
    return expert_usage_from_model(net, batches, out_dir, name=Path(model).name)
