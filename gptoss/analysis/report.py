"""Architecture report: parameters total vs active, KV-cache bytes per token (MHA vs GQA vs GQA + sliding
window) and FLOPs per token, as a markdown table and a bar chart.

Every number comes from `gptoss.config` (`param_counts`, `flops_per_token`, `kv_cache_bytes_per_token`);
this module only selects and formats them, so the report cannot drift from what training logs as MFU.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from gptoss.analysis import AnalysisError
from gptoss.analysis.plots import plot_report
from gptoss.analysis.units import BYTES, COUNT, scaled
from gptoss.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    flops_per_token,
    get_config,
    kv_cache_bytes_per_token,
    param_counts,
    read_json_object,
)

KV_KINDS = {"mha": "MHA (every head keeps K, V)", "gqa": "GQA", "gqa_sliding": "GQA + sliding window"}


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a ModelConfig JSON, a transformers config.json, or a run / export dir holding one."""
    path = Path(spec)
    if spec not in PRESETS and not path.exists():
        raise AnalysisError(f"--model {spec}: not a preset ({', '.join(PRESETS)}), a JSON file or a run/export dir")
    if spec not in PRESETS and path.is_dir():
        found = [path / n for n in ("gptoss_config.json", "model_config.json", "config.json") if (path / n).is_file()]
        if not found:
            raise AnalysisError(f"{path}: no gptoss_config.json, model_config.json or config.json in this dir")
        spec, path = str(found[0]), found[0]
    try:
        if spec not in PRESETS and path.is_file() and (d := read_json_object(path)).get("model_type") == "gpt_oss":
            from gptoss.hf import from_hf_config  # a transformers config.json (an export)

            return from_hf_config(d)
        return get_config(spec)
    except (ConfigError, TypeError) as e:
        raise AnalysisError(str(e)) from e


def architecture_numbers(cfg: ModelConfig, context: int, bytes_per_elem: int = 2) -> dict[str, Any]:
    """The report's numbers for one model at one context length (KV bytes at `bytes_per_elem`, bf16 = 2).
    With a data vocabulary `params` and the FLOPs are what is trained (kept ids + tail row), the `_exported`
    ones those of the 201,088-id model an export holds; without one they are equal."""
    p = param_counts(cfg)
    kv = kv_cache_bytes_per_token(cfg, context, bytes_per_elem)
    return {
        "vocab_rows": cfg.trained_vocab_size,
        "params": p,
        "params_exported": param_counts(cfg, vocab="exported"),
        "flops_per_token_train_exported": flops_per_token(cfg, context, training=True, vocab="exported"),
        "kv_bytes_per_token": kv,
        "kv_bytes_at_context": {k: v * context for k, v in kv.items()},
        "flops_per_token_train": flops_per_token(cfg, context, training=True),
        "flops_per_token_infer": flops_per_token(cfg, context, training=False),
        "context": context,
        "bytes_per_elem": bytes_per_elem,
    }


_count = functools.partial(scaled, units=COUNT, spec=",.3f", unscaled_spec=",.0f")
_bytes = functools.partial(scaled, units=BYTES, spec=",.2f", unscaled_spec=",.0f")


def report_markdown(numbers: dict[str, dict[str, Any]]) -> str:
    """One column per model; exact counts in parentheses where rounding would hide them."""
    names = list(numbers)
    first = numbers[names[0]]
    ctx, bpe = first["context"], first["bytes_per_elem"]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fmt: Any, get: Any) -> None:
        rows.append((label, [fmt(get(numbers[n])) for n in names]))

    exact = lambda n: f"{_count(n)} ({n:,})"  # noqa: E731
    add("parameters, total", exact, lambda x: x["params"]["total"])
    add("parameters, active per token", exact, lambda x: x["params"]["active"])
    add("total excl. unembedding", exact, lambda x: x["params"]["total_excl_unembedding"])
    add("active excl. unembedding", exact, lambda x: x["params"]["active_excl_unembedding"])
    add("active / total", lambda v: f"{v:.1%}", lambda x: x["params"]["active"] / x["params"]["total"])
    for key, label in KV_KINDS.items():
        add(f"KV cache per token, {label}", _bytes, lambda x, k=key: x["kv_bytes_per_token"][k])
    for key, label in KV_KINDS.items():
        add(f"KV cache for {ctx:,} tokens, {label}", _bytes, lambda x, k=key: x["kv_bytes_at_context"][k])
    add("FLOPs per token, training (fwd + bwd)", lambda v: f"{v / 1e9:,.3f} G", lambda x: x["flops_per_token_train"])
    add("FLOPs per token, inference (fwd)", lambda v: f"{v / 1e9:,.3f} G", lambda x: x["flops_per_token_infer"])
    if any(x["params_exported"] != x["params"] for x in numbers.values()):  # a data vocabulary (--vocab data)
        add("vocabulary rows trained", lambda v: f"{v:,}", lambda x: x["vocab_rows"])
        add("parameters, total as exported (every id)", exact, lambda x: x["params_exported"]["total"])
        add("FLOPs per token, training, every id's row", lambda v: f"{v / 1e9:,.3f} G",
            lambda x: x["flops_per_token_train_exported"])
    header = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    body = "\n".join(f"| {label} | " + " | ".join(vals) + " |" for label, vals in rows)
    note = (f"\n\nContext {ctx:,} tokens; KV cache at {bpe} bytes per element; the sliding-window column counts "
            "each sliding layer's window (its ring buffer) spread over the context. Training FLOPs = 3x forward "
            "(PaLM MFU convention), attention with the causal / windowed span. Source: gptoss.config "
            "param_counts, kv_cache_bytes_per_token, flops_per_token.")
    return header + body + note


def write_report(models: list[str], out_dir: str | Path, context: int = 4096,
                 bytes_per_elem: int = 2) -> dict[str, Path]:
    """report.md and report.png (+ report.json with the raw numbers) in out_dir; returns their paths."""
    if context < 1:
        raise AnalysisError(f"--context {context}: must be >= 1")
    numbers = {spec if spec in PRESETS else Path(spec).stem: architecture_numbers(resolve_config(spec), context,
                                                                                   bytes_per_elem)
               for spec in models}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "png": out / "report.png", "json": out / "report.json"}
    paths["md"].write_text(report_markdown(numbers) + "\n")
    paths["json"].write_text(json.dumps(numbers, indent=2) + "\n")
    plot_report(numbers, paths["png"])
    return paths
