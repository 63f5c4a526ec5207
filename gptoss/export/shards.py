"""Safetensors shards of a bounded size, named and indexed as transformers' `save_pretrained` does.

Separate from `write` because it knows nothing of models or configs: it takes named tensors in order and
cuts them into files of at most `max_shard_size` bytes (`parse_size` reads '5GB'-style sizes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gptoss.errors import ExportError
from gptoss.export.layout import INDEX_NAME, WEIGHTS_NAME, shard_name


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, like transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ExportError(f"max_shard_size {size!r}: expected bytes or a size like '5GB' or '500MiB'")
    unit = (m[2] or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m[1]) * base**power)


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (a bigger single tensor gets its own shard), named and
    indexed like transformers' `save_pretrained`: model.safetensors, or model-0000i-of-0000n.safetensors
    plus model.safetensors.index.json."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out_dir / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates 0600 files; an export is meant to be shared
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.out_dir / WEIGHTS_NAME)
            return
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(self.shards, start=1):
            path.rename(self.out_dir / shard_name(i, n))
            weight_map.update(dict.fromkeys(keys, shard_name(i, n)))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
