"""Shared test helpers: free ports, launching CPU ranks, a small-vocab data dir for fast training runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptoss.config import get_config
from gptoss.data import write_prepared

REPO = Path(__file__).resolve().parent.parent
TINY_VOCAB = 512
TRAIN = REPO / "launch" / "train.py"
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A finished subprocess that exited 0; its output tails otherwise."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def no_partial_dirs(parent: Path) -> bool:
    """No temporary export dir left behind (exports write `.<name>.partial-*` and rename)."""
    return not any(".partial-" in p.name for p in parent.iterdir())


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


def write_learnable_data(out: Path, vocab: int, sizes: dict[str, int]) -> None:
    """A prepared-data dir of uint32 splits drawn from a learnable stream (mostly t -> 5t + 3 mod vocab)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in sizes.items():
        tokens = np.empty(n, dtype="<u4")
        tokens[0] = 1
        for i in range(1, n):
            follow = rng.random() < 0.8
            tokens[i] = (tokens[i - 1] * 5 + 3) % vocab if follow else rng.integers(vocab)
        splits[split] = tokens
    write_prepared(out, splits, tokenizer="synthetic", vocab_size=vocab, eot_id=0, source="conftest")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared-data dir with a 512-token vocabulary (learnable: mostly t -> 5t + 3 mod V), and
    `model.json`, the tiny preset with that vocabulary. The real 201k vocabulary makes the lm_head
    dominate CPU time; this keeps a training step around 50 ms."""
    out = tmp_path_factory.mktemp("tiny_data")
    write_learnable_data(out, TINY_VOCAB, {"train": 8192, "val": 1024})
    get_config("tiny", vocab_size=TINY_VOCAB).save(out / "model.json")
    return out


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run, by step."""
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def train_flags(data: Path, out: Path, *extra: str, steps: int = 8) -> list[str]:
    """launch/train.py flags for a short tiny_data run: eval at 4, saves every 3, the last 2 kept."""
    return ["--ds_config", str(CPU_CONFIG), "--model", str(data / "model.json"), "--data", str(data),
            "--out", str(out), "--max_steps", str(steps), "--seq_len", "32", "--eval_every", "4",
            "--eval_batches", "2", "--save_every", "3", "--keep_last", "2", "--log_every", "1", *extra]


def wait_for_metrics(out: Path, proc: subprocess.Popen, lines: int, timeout: float = 300) -> None:
    """Block until a running training process has written `lines` metrics records."""
    deadline = time.monotonic() + timeout
    path = Path(out) / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {lines} metrics records (exit {proc.poll()})")


def signal_checkpoint(out: Path, proc: subprocess.Popen, log: Path) -> tuple[str, dict]:
    """After a SIGTERM/SIGUSR1: the run exited 0 and `latest` names a checkpoint saved for the signal.
    Returns (tag, train_state.json)."""
    assert proc.returncode == 0, log.read_text()[-3000:]
    tag = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / tag / "train_state.json").read_text())
    assert state["reason"] == "signal" and tag == f"step{state['step']:08d}", state
    return tag, state


def call_main(capsys, monkeypatch, tiny_data: Path, out: Path, ds: dict | None = None, world: int = 1,
              **overrides) -> str:
    """Run `gptoss.train.main` in-process (checks that stop before any process group); returns the one stderr
    line after checking exit status 2. `ds` overrides keys of ds_configs/cpu.json."""
    from gptoss.train import TrainArgs, main

    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    ds_path = CPU_CONFIG
    if ds is not None:
        ds_path = out.parent / "ds.json"
        ds_path.write_text(json.dumps({**json.loads(CPU_CONFIG.read_text()), **ds}))
    kwargs = dict(ds_config=str(ds_path), model=str(tiny_data / "model.json"), data=str(tiny_data), out=str(out),
                  max_steps=4, seq_len=32, eval_every=2, eval_batches=2)
    assert main(TrainArgs(**{**kwargs, **overrides})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def one_thread():
    """Decoding a tiny model is thousands of tiny ops; a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
