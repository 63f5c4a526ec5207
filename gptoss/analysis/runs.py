"""A training run as the trainer leaves it: `metrics.jsonl` (one JSON record per logged or evaluated step)
and `model_config.json`, read into the curves the comparison plots.

Record fields used (written by `gptoss.train`): step, tokens, loss, elapsed_s (seconds spent in training
steps so far, evaluation and checkpointing excluded, carried over on resume: the fair wall-clock axis when
two models evaluate and save differently), val_loss and val_bpb (evaluation steps), expert_load (per layer,
each expert's share of the assignments in that step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss.analysis import AnalysisError
from gptoss.config import ModelConfig

METRICS = "metrics.jsonl"
MODEL_CONFIG = "model_config.json"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (or of the one in a run dir), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise AnalysisError(f"{path}: no metrics file (is this a run dir written by launch/train.py?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{path}:{n}: not a JSON record ({e.msg})") from e
    return records


@dataclass
class Run:
    """One run dir: its name (the dir name), records, config (None when model_config.json is missing)."""

    name: str
    records: list[dict[str, Any]]
    config: ModelConfig | None

    def curve(self, key: str) -> tuple[list[int], list[float], list[float]]:
        """(tokens, training seconds, value) at every record that has `key` (loss, val_loss, val_bpb)."""
        pts = [(r["tokens"], r["elapsed_s"], r[key]) for r in self.records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def load_run(path: str | Path) -> Run:
    path = Path(path)
    records = read_metrics(path)
    if not records:
        raise AnalysisError(f"{path / METRICS}: empty (did the run log any step?)")
    if any("elapsed_s" not in r for r in records):
        raise AnalysisError(f"{path / METRICS}: records without elapsed_s (not written by this gptoss's trainer)")
    cfg_path = path / MODEL_CONFIG
    config = ModelConfig.load(cfg_path) if cfg_path.is_file() else None
    return Run(name=path.name, records=records, config=config)
