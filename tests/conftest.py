"""Shared test helpers: free ports, launching CPU ranks, a small-vocab data dir for fast training runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptoss.config import get_config

REPO = Path(__file__).resolve().parent.parent
TINY_VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """DeepSpeed on its CPU accelerator; one thread per rank (two cores, and tiny matmuls lose to thread sync)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def rank_command(script: str | Path, *args: str, nproc: int = 1) -> list[str]:
    """`python script args` for one process, `python -m torch.distributed.run` for several CPU ranks."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(script), *args]


def launch(script: str | Path, *args: str, nproc: int = 1, timeout: float = 600,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run to completion in the repo root; stdout/stderr captured as text."""
    return subprocess.run(rank_command(script, *args, nproc=nproc), cwd=REPO, env=env or cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared-data dir with a 512-token vocabulary (learnable: mostly t -> 5t + 3 mod V), and
    `model.json`, the tiny preset with that vocabulary. The real 201k vocabulary makes the lm_head
    dominate CPU time; this keeps a training step around 50 ms."""
    out = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 8192), ("val", 1024)):
        tokens = np.empty(n, dtype="<u4")
        tokens[0] = 1
        for i in range(1, n):
            follow = rng.random() < 0.8
            tokens[i] = (tokens[i - 1] * 5 + 3) % TINY_VOCAB if follow else rng.integers(TINY_VOCAB)
        tokens.tofile(out / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": n, "documents": 1, "sha256": ""}
    meta = {"format_version": 1, "tokenizer": "synthetic", "vocab_size": TINY_VOCAB, "eot_id": 0,
            "dtype": "uint32", "splits": splits}
    (out / "meta.json").write_text(json.dumps(meta))
    get_config("tiny", vocab_size=TINY_VOCAB).save(out / "model.json")
    return out


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run, by step."""
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}
