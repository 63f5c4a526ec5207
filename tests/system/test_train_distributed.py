"""The training driver on two CPU ranks (torch.distributed.run, gloo), against one rank at the same global batch.

The global batch is drawn independently of the world size, so 1 rank x 2 micro-batches and 2 ranks x 1
micro-batch (ZeRO-1, ZeRO-2, expert parallelism 2) must follow the same trajectory up to float rounding.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, cpu_env, free_port, launch, rank_command, read_metrics, signal_checkpoint

TRAIN = REPO / "launch" / "train.py"
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"
STEPS = 6

pytestmark = pytest.mark.slow


def flags(data: Path, out: Path, ds_config: Path = CPU_CONFIG, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--ds_config", str(ds_config), "--model", str(data / "model.json"), "--data", str(data),
            "--out", str(out), "--max_steps", str(steps), "--seq_len", "32", "--eval_every", "3",
            "--eval_batches", "2", "--save_every", "3", "--keep_last", "0", "--log_every", "1", *extra]


def train(data: Path, out: Path, nproc: int, *extra: str, zero: int = 2) -> dict[int, dict]:
    ds = out.parent / f"{out.name}_zero{zero}.json"
    ds.parent.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(CPU_CONFIG.read_text())
    cfg["zero_optimization"]["stage"] = zero
    ds.write_text(json.dumps(cfg))
    proc = launch(TRAIN, *flags(data, out, ds, *extra), nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(out)


def assert_same_trajectory(a: dict[int, dict], b: dict[int, dict], tol: float) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("loss", "aux_loss", "grad_norm", "val_loss"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], abs=tol), (step, key)


@pytest.fixture(scope="module")
def one_rank(tiny_data, tmp_path_factory) -> dict[int, dict]:
    return train(tiny_data, tmp_path_factory.mktemp("w1") / "run", 1)


@pytest.fixture(scope="module")
def two_ranks_zero2(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w2") / "run"
    train(tiny_data, out, 2)
    return out


def test_two_ranks_zero2_match_one_rank(one_rank, two_ranks_zero2):
    m = read_metrics(two_ranks_zero2)
    assert_same_trajectory(one_rank, m, 1e-5)
    assert m[STEPS]["loss"] < m[1]["loss"]
    assert all(sum(layer) == pytest.approx(1.0) for layer in m[1]["expert_load"])
    tag = two_ranks_zero2 / "checkpoints" / f"step{STEPS:08d}"
    assert {"rank0_state.pt", "rank1_state.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {p.name for p in tag.iterdir()}


@pytest.mark.parametrize("zero,ep", [(1, 1), (2, 2)])
def test_zero1_and_expert_parallel_match_one_rank(one_rank, tiny_data, tmp_path, zero, ep):
    m = train(tiny_data, tmp_path / "run", 2, "--ep_size", str(ep), zero=zero)
    assert_same_trajectory(one_rank, m, 1e-5)


def test_expert_parallel_with_activation_checkpointing_matches_one_rank(one_rank, tiny_data, tmp_path):
    """Each recomputed block repeats its MoE all-to-all in the backward pass; both ranks recompute the blocks in
    the same order, so the collectives pair up and the trajectory is one rank's without checkpointing."""
    m = train(tiny_data, tmp_path / "run", 2, "--ep_size", "2", "--activation_checkpointing")
    assert_same_trajectory(one_rank, m, 1e-5)


def test_two_rank_resume_is_bit_for_bit(two_ranks_zero2, tiny_data, tmp_path):
    """Pretend the 2-rank run died after step 3; resumed on 2 ranks, steps 4-6 equal the uninterrupted ones."""
    out = tmp_path / "resumed"
    shutil.copytree(two_ranks_zero2, out)
    for tag in (out / "checkpoints").glob("step*"):
        if tag.name != "step00000003":
            shutil.rmtree(tag)
    (out / "checkpoints" / "latest").write_text("step00000003")
    proc = launch(TRAIN, *flags(tiny_data, out, CPU_CONFIG, "--resume"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = read_metrics(two_ranks_zero2), read_metrics(out)
    for step in range(4, STEPS + 1):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load", "val_loss"):
            assert resumed[step].get(key) == full[step].get(key), (step, key)


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tiny_data, tmp_path):
    """Only rank 1 gets the signal; the per-step all-reduce makes rank 0 stop and save at the same step."""
    out = tmp_path / "term"
    log = tmp_path / "term.log"
    cmd = rank_command(TRAIN, *flags(tiny_data, out, CPU_CONFIG, "--save_every", "0", steps=5000), nproc=2)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            metrics = out / "metrics.jsonl"
            while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            rank1 = next(p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1")
            rank1.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    tag, state = signal_checkpoint(out, proc, log)
    assert state["world_size"] == 2
    assert {"rank0_state.pt", "rank1_state.pt"} <= {p.name for p in (out / "checkpoints" / tag).iterdir()}


def test_deepspeed_launcher(tiny_data, tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py` (it appends --local_rank=N) gives the same run as torchrun."""
    out = tmp_path / "ds"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), *flags(tiny_data, out, CPU_CONFIG, "--eval_every", "0", steps=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "run_args.json").read_text())["world_size"] == 2
    assert sorted(read_metrics(out)) == [1, 2]
