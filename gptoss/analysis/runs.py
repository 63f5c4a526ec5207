"""A training run as the trainer leaves it: `metrics.jsonl` (one JSON record per logged or evaluated step)
and `model_config.json`, read into the curves the comparison plots.

Record fields used (written by `gptoss.train`): step, tokens, loss, elapsed_s (seconds spent in training
steps so far, evaluation and checkpointing excluded, carried over on resume: the fair wall-clock axis when
two models evaluate and save differently), val_loss (evaluation steps), expert_load (per layer, each
expert's share of the assignments in that step).

Runs written before elapsed_s existed get training seconds rebuilt from throughput: each logged record
covers (tokens - tokens at the previous logged record) / tokens_per_s seconds.
"""

from __future__ import annotations

import functools
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


def training_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Cumulative seconds of training steps at each record (see the module docstring).

    A record without tokens_per_s (an evaluation between logged steps) gets the time of its tokens at the
    rate of the next logged record, or of the previous one at the end of the file.
    """
    if records and all("elapsed_s" in r for r in records):
        return [float(r["elapsed_s"]) for r in records]
    rates = [r.get("tokens_per_s") for r in records]
    out: list[float] = []
    elapsed, base_tokens, last_rate = 0.0, 0, None
    for i, r in enumerate(records):
        tokens = int(r.get("tokens", 0))
        rate = rates[i]
        if rate:  # a logged record closes a throughput window
            elapsed += (tokens - base_tokens) / rate
            base_tokens, last_rate = tokens, rate
            out.append(elapsed)
            continue
        nxt = next((x for x in rates[i + 1:] if x), None) or last_rate
        out.append(elapsed + ((tokens - base_tokens) / nxt if nxt else 0.0))
    return out


@dataclass
class Run:
    """One run dir: its name (the dir name), records, config (None when model_config.json is missing)."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: ModelConfig | None

    @functools.cached_property
    def seconds(self) -> list[float]:
        return training_seconds(self.records)

    def curve(self, key: str) -> tuple[list[int], list[float], list[float]]:
        """(tokens, training seconds, value) at every record that has `key`."""
        pts = [(r["tokens"], s, r[key]) for r, s in zip(self.records, self.seconds) if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]

    def val_curve(self) -> tuple[list[int], list[float], list[float]]:
        """(tokens, training seconds, val loss) at every evaluation."""
        return self.curve("val_loss")

    def bpb_curve(self) -> tuple[list[int], list[float], list[float]]:
        """(tokens, training seconds, val bits per byte) at every evaluation that measured it."""
        return self.curve("val_bpb")

    def train_curve(self) -> tuple[list[int], list[float], list[float]]:
        """(tokens, training seconds, train loss) at every logged step."""
        return self.curve("loss")


def load_run(path: str | Path) -> Run:
    path = Path(path)
    records = read_metrics(path)
    if not records:
        raise AnalysisError(f"{path / METRICS}: empty (did the run log any step?)")
    cfg_path = path / MODEL_CONFIG
    config = ModelConfig.load(cfg_path) if cfg_path.is_file() else None
    return Run(name=path.name, path=path, records=records, config=config)
