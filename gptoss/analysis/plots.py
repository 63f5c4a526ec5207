"""The figures (matplotlib, Agg backend, PNG): loss curves, expert usage, attention maps, the report chart.

Each function takes plain data (runs, arrays, maps, report numbers) and a path, draws one figure and
closes it, so they run headless in tests and training jobs alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gptoss.analysis.units import BYTES, COUNT, FLOPS, scaled

if TYPE_CHECKING:
    from gptoss.analysis.runs import Run


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# ---- comparison --------------------------------------------------------------------------------------

def plot_loss_curves(runs: list[Run], path: str | Path, title: str | None = None) -> Path:
    """Loss against tokens seen and against training seconds; validation loss as markers and solid lines,
    training loss as faint lines behind it (validation points are few in short runs). When a run measured
    validation bits per byte, a second row shows it the same two ways."""
    plt = _pyplot()
    with_bpb = any(run.curve("val_bpb")[2] for run in runs)
    fig, grid = plt.subplots(2 if with_bpb else 1, 2, figsize=(12, 8.5 if with_bpb else 4.5), sharey="row",
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run, color in zip(runs, colors * (1 + len(runs) // len(colors))):
        t_tok, t_sec, t_loss = run.curve("loss")
        v_tok, v_sec, v_loss = run.curve("val_loss")
        for ax, tx, vx in ((grid[0][0], t_tok, v_tok), (grid[0][1], t_sec, v_sec)):
            if t_loss:
                ax.plot(tx, t_loss, color=color, alpha=0.25, linewidth=1)
            if v_loss:
                ax.plot(vx, v_loss, color=color, marker="o", markersize=3, label=f"{run.name} (val)")
        if with_bpb:
            b_tok, b_sec, bpb = run.curve("val_bpb")
            for ax, bx in ((grid[1][0], b_tok), (grid[1][1], b_sec)):
                if bpb:
                    ax.plot(bx, bpb, color=color, marker="o", markersize=3, label=f"{run.name} (val)")
    for row, ylabel in zip(grid, ("loss (val: markers; train: faint)", "validation bits per byte")):
        row[0].set(xlabel="tokens seen", ylabel=ylabel)
        row[1].set(xlabel="training seconds (steps only, eval excluded)")
    for ax in grid.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Validation loss: " + " vs ".join(r.name for r in runs))
    fig.tight_layout()
    return _save(fig, path)


# ---- experts -----------------------------------------------------------------------------------------

def plot_expert_load(steps: np.ndarray, load: np.ndarray, path: str | Path, title: str = "") -> Path:
    """One heatmap per layer: experts (rows) x logged steps (columns), colour = share of assignments.

    The colour scale is shared and centred on the balanced share 1/E (white), so overloaded experts are
    red and starved ones blue in every panel alike.
    """
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    n_layers, E = load.shape[1], load.shape[2]
    cols = min(4, n_layers)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 2.4 * rows + 0.8), squeeze=False,
                             layout="constrained")
    uniform = 1.0 / E
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(float(load.max()), 2 * uniform))
    image = None
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= n_layers:
            ax.axis("off")
            continue
        image = ax.imshow(load[:, layer, :].T, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yticks(range(E) if E <= 16 else np.linspace(0, E - 1, 5).astype(int))
        ax.tick_params(labelsize=7)
        if layer % cols == 0:
            ax.set_ylabel("expert")
        if layer // cols == rows - 1:
            ax.set_xlabel("step")
    cbar = fig.colorbar(image, ax=axes, shrink=0.8)
    cbar.set_label(f"share of assignments\n(balanced = 1/{E} = {uniform:.3f})")
    fig.suptitle(title or "Expert load over training")
    return _save(fig, path)


def plot_expert_counts(counts: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Layers x experts heatmap of one evaluation's assignment shares, each cell annotated in percent."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(counts.sum(-1, keepdims=True), 1e-12)
    n_layers, E = share.shape
    uniform = 1.0 / E
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * E + 2), max(2.5, 0.45 * n_layers + 1.2)))
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(float(share.max()), 2 * uniform))
    image = ax.imshow(share, cmap="RdBu_r", norm=norm, aspect="auto")
    if E <= 32 and n_layers <= 48:
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    ax.set(xlabel="expert", ylabel="layer", xticks=range(E) if E <= 32 else [], yticks=range(n_layers))
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label(f"share of assignments (balanced = {uniform:.3f}); cells in %")
    ax.set_title(title or f"Tokens per expert ({int(counts[0].sum()):,} assignments per layer)")
    return _save(fig, path)


# ---- attention ---------------------------------------------------------------------------------------

def plot_attention(maps: list[Any], path: str | Path, tokens: list[str] | None = None,
                   title: str = "") -> Path:
    """`gptoss.analysis.attention.AttentionMap`s (not imported: that module draws through this one).
    Per layer one row of per-head maps (query rows, key columns, sqrt colour scale so small
    probabilities stay visible), and a last row with each head's mean probability on its sink."""
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    n_heads = maps[0].probs.shape[0]
    T = maps[0].probs.shape[-1]
    fig = plt.figure(figsize=(2.0 * n_heads + 1, 2.1 * len(maps) + 2.8))
    grid = fig.add_gridspec(len(maps) + 1, n_heads, height_ratios=[1.0] * len(maps) + [1.1])
    label_tokens = tokens is not None and len(tokens) == T and T <= 24
    image = None
    for row, m in enumerate(maps):
        for h in range(n_heads):
            ax = fig.add_subplot(grid[row, h])
            image = ax.imshow(m.probs[h].numpy(), cmap="magma", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                              interpolation="nearest")
            kind = m.kind.removesuffix("_attention")
            ax.set_title(f"L{m.layer} {kind} h{h}\nsink {m.sink_mass_per_head[h]:.2f}", fontsize=7)
            if label_tokens:
                ax.set_xticks(range(T), tokens, rotation=90, fontsize=5)
                ax.set_yticks(range(T), tokens, fontsize=5) if h == 0 else ax.set_yticks([])
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if h == 0:
                ax.set_ylabel("query", fontsize=7)
    bars = fig.add_subplot(grid[len(maps), :])
    width = 0.8 / len(maps)
    for i, m in enumerate(maps):
        label = f"layer {m.layer} ({m.kind.removesuffix('_attention')}" + (f", W={m.window})" if m.window else ")")
        bars.bar(np.arange(n_heads) + (i - (len(maps) - 1) / 2) * width, m.sink_mass_per_head.numpy(), width,
                 label=label)
    bars.set(xlabel="head", ylabel="mean prob. on sink", xticks=range(n_heads), ylim=(0, 1))
    bars.legend(fontsize=8)
    bars.grid(True, axis="y", alpha=0.3)
    fig.colorbar(image, ax=fig.axes[:-1], shrink=0.6, label="attention probability (sqrt scale)")
    fig.suptitle(title or f"Attention per head ({T} tokens) and probability mass on the sink")
    return _save(fig, path)


# ---- report ------------------------------------------------------------------------------------------

def plot_report(numbers: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Three stacked panels, one group of bars per model: parameters (total vs active), KV cache per token
    (MHA vs GQA vs GQA + sliding window), FLOPs per token (training vs inference). Log scales when the
    models differ by orders of magnitude."""
    plt = _pyplot()
    names = list(numbers)
    x = np.arange(len(names))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 2.4 * len(names) + 2), 11))
    ctx = numbers[names[0]]["context"]
    panels = [
        ("parameters", lambda v: scaled(v, COUNT, ".3g"),
         [("total", lambda n: n["params"]["total"]), ("active per token", lambda n: n["params"]["active"])]),
        (f"KV cache per token of context (context {ctx:,}, {numbers[names[0]]['bytes_per_elem']} B/elem)",
         lambda v: scaled(v, BYTES, ".3g"),
         [("MHA", lambda n: n["kv_bytes_per_token"]["mha"]), ("GQA", lambda n: n["kv_bytes_per_token"]["gqa"]),
          ("GQA + sliding window", lambda n: n["kv_bytes_per_token"]["gqa_sliding"])]),
        (f"FLOPs per token (context {ctx:,})", lambda v: scaled(v, FLOPS, ".3g"),
         [("training (fwd + bwd)", lambda n: n["flops_per_token_train"]),
          ("inference (fwd)", lambda n: n["flops_per_token_infer"])]),
    ]
    for ax, (title, label_fn, series) in zip(axes, panels):
        width = 0.8 / len(series)
        values_all = []
        for i, (label, get) in enumerate(series):
            values = [get(numbers[n]) for n in names]
            values_all += values
            pos = x + (i - (len(series) - 1) / 2) * width
            ax.bar(pos, values, width, label=label)
            for px, v in zip(pos, values):
                ax.text(px, v, label_fn(v), ha="center", va="bottom", fontsize=8)
        if min(values_all) > 0 and max(values_all) / min(values_all) > 100:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_xticks(x, names)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Architecture report (gptoss.config arithmetic)")
    fig.tight_layout()
    return _save(fig, path)

