"""Expert parallelism inside real DeepSpeed engines on two CPU ranks (gloo).

The same model, data and seed trained with (world 1, ep 1), (world 2, ep 1) and (world 2, ep 2) under
ZeRO-1/2 must follow the same trajectory; a checkpoint saved under ep 2 must resume exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from gptoss.config import ConfigError, get_config
from gptoss.model import validate_parallelism

WORKER = Path(__file__).parent / "workers" / "moe_worker.py"


def run(out: Path, nproc: int, *args: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(WORKER), "--out", str(out), *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    weights: dict[str, torch.Tensor] = {}
    for rank in range(nproc):
        weights.update(torch.load(out / f"weights_rank{rank}.pt"))
    return json.loads((out / "losses.json").read_text()), weights


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    return run(tmp_path_factory.mktemp("w1ep1"), 1, "--ep_size", "1", "--zero", "2")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_ep2_equals_ep1_equals_single_rank(tmp_path, single_rank, zero):
    losses1, weights1 = single_rank
    losses_ep1, weights_ep1 = run(tmp_path / "ep1", 2, "--ep_size", "1", "--zero", str(zero))
    losses_ep2, weights_ep2 = run(tmp_path / "ep2", 2, "--ep_size", "2", "--zero", str(zero))
    assert losses_ep1 == pytest.approx(losses1, abs=1e-5)
    assert losses_ep2 == pytest.approx(losses1, abs=1e-5)
    assert_same_weights(weights_ep1, weights1)
    assert_same_weights(weights_ep2, weights1)
    assert len(set(losses1)) == len(losses1)  # the weights moved: not two untouched initialisations


@pytest.mark.slow
def test_save_under_ep2_resume_under_ep2_is_exact(tmp_path):
    full_losses, full_weights = run(tmp_path / "full", 2, "--ep_size", "2", "--steps", "4", "--save_at", "2")
    ckpt = tmp_path / "full" / "ckpt"
    tag = ckpt / "mid"
    expert_files = sorted(p.name for p in tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    cfg = get_config("tiny")
    assert len(expert_files) == cfg.num_hidden_layers * cfg.num_local_experts  # global ids 0..E-1 per layer
    resumed_losses, resumed_weights = run(tmp_path / "resumed", 2, "--ep_size", "2", "--steps", "4",
                                          "--load", str(ckpt))
    assert resumed_losses == pytest.approx(full_losses[2:], abs=1e-6)
    assert_same_weights(resumed_weights, full_weights, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=2, ep_size=2, zero_stage=3), "ZeRO-3"),
    (dict(world_size=2, ep_size=3, zero_stage=2), "does not divide num_local_experts"),
    (dict(world_size=2, ep_size=4, zero_stage=2), "does not divide the world size"),
    (dict(world_size=2, ep_size=0, zero_stage=2), "must be >= 1"),
])
def test_unsupported_layouts_refused_with_reason(kwargs, match):
    cfg = get_config("tiny")  # 4 experts
    with pytest.raises(ConfigError, match=match):
        validate_parallelism(cfg, **kwargs)


def test_dense_model_refuses_expert_parallelism():
    with pytest.raises(ConfigError, match="no experts"):
        validate_parallelism(get_config("gpt2-tiny"), world_size=2, ep_size=2, zero_stage=2)
