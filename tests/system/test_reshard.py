"""Resume on another world size or --ep_size (gptoss.train.reshard), with real DeepSpeed engines on CPU ranks.

A = world 2, ep 2, steps 1-8 uninterrupted (saved at 4); W1 = the same on one rank. Resumed from step 4 at another
layout, steps 5-8 must follow A up to summation order, and right after the restore every parameter's fp32 master
weights and Adam moments must equal the saved ones element for element (tests/system/workers/reshard_worker.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch, read_metrics

from gptoss.export import export
from gptoss.generate import load_model

TRAIN = REPO / "launch" / "train.py"
WORKER = REPO / "tests" / "system" / "workers" / "reshard_worker.py"
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"
STEPS, SAVED = 8, 4

pytestmark = pytest.mark.slow


def flags(data: Path, out: Path, zero: int, *extra: str) -> list[str]:
    """ZeRO-2 runs in fp32 (as ds_configs/cpu.json), ZeRO-1 ones in bf16 (fp32 master weights that differ from
    the module's)."""
    ds = out.parent / f"{out.name}_zero{zero}.json"
    cfg = json.loads(CPU_CONFIG.read_text())
    cfg["zero_optimization"]["stage"] = zero
    cfg["bf16"] = {"enabled": zero == 1}
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.write_text(json.dumps(cfg))
    return ["--ds_config", str(ds), "--model", str(data / "model.json"), "--data", str(data), "--out", str(out),
            "--max_steps", str(STEPS), "--seq_len", "32", "--eval_every", "100", "--save_every", str(SAVED),
            "--keep_last", "0", "--log_every", "1", *extra]


def run(script: Path, data: Path, out: Path, nproc: int, ep: int, zero: int = 2, *extra: str) -> str:
    proc = launch(script, *flags(data, out, zero, "--ep_size", str(ep), *extra), nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


def saved_at_step4(run_dir: Path, out: Path) -> Path:
    """A copy of `run_dir` as it was right after its step-4 checkpoint (the later one and its metrics gone)."""
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "checkpoints" / f"step{STEPS:08d}")
    (out / "checkpoints" / "latest").write_text(f"step{SAVED:08d}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= SAVED))
    return out


def assert_follows(reference: Path, resumed: Path, rel: float) -> None:
    a, b = read_metrics(reference), read_metrics(resumed)
    for step in range(SAVED + 1, STEPS + 1):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=rel), (step, key)
        assert b[step]["lr"] == a[step]["lr"], step


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs: world 2 ep 2 (ZeRO-2 fp32, ZeRO-1 bf16) and world 1."""
    root = tmp_path_factory.mktemp("reshard")
    out = {"A": root / "A", "W1": root / "W1", "Z1": root / "Z1"}
    run(TRAIN, tiny_data, out["A"], 2, 2)
    run(TRAIN, tiny_data, out["W1"], 1, 1)
    run(TRAIN, tiny_data, out["Z1"], 2, 2, 1)
    return out


@pytest.mark.parametrize("name,source,nproc,ep,zero", [
    ("B: world 2 ep 2 -> world 1 ep 1", "A", 1, 1, 2),
    ("C: world 1 -> world 2 ep 2", "W1", 2, 2, 2),
    ("world 2: ep 2 -> ep 1", "A", 2, 1, 2),
    ("ZeRO-1 bf16: world 2 ep 2 -> world 1", "Z1", 1, 1, 1),
])
def test_resume_at_another_layout_follows_the_uninterrupted_run(runs, tiny_data, tmp_path, name, source, nproc,
                                                                  ep, zero):
    out = saved_at_step4(runs[source], tmp_path / "resumed")
    log = run(TRAIN, tiny_data, out, nproc, ep, zero, "--resume")
    old = (2, 2) if source in ("A", "Z1") else (1, 1)
    assert f"resharding step{SAVED:08d}: world {old[0]} ep {old[1]} -> world {nproc} ep {ep}" in log
    assert re.search(rf"reshard step{SAVED:08d}: 100%\|[^|]*\| (\d+)/\1 ", log), log[-2000:]  # its bar ran to the end
    # W1 follows A too (the data stream and the batch are global); bf16 rounds each world's sums differently.
    assert_follows(runs["Z1"] if zero == 1 else runs["A"], out, 1e-2 if zero == 1 else 1e-5)
    state = json.loads((out / "checkpoints" / f"step{STEPS:08d}" / "train_state.json").read_text())
    assert (state["world_size"], state["ep_size"], state["parent"]) == (nproc, ep, f"step{SAVED:08d}")
    if name.startswith("B"):  # the exports at step 8 agree
        x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        logits = []
        for run_dir in (runs["A"], out):
            model = load_model(export(run_dir, tmp_path / f"hf_{run_dir.name}", progress=False), "cpu", "fp32")
            with torch.no_grad():
                logits.append(model(x).logits)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source,nproc,ep,zero", [("A", 1, 1, 2), ("W1", 2, 2, 2), ("Z1", 1, 1, 1)])
def test_optimizer_state_right_after_a_resharded_restore_equals_the_saved_one(runs, tiny_data, tmp_path, source,
                                                                             nproc, ep, zero):
    out = saved_at_step4(runs[source], tmp_path / "resumed")
    run(WORKER, tiny_data, out, nproc, ep, zero, "--resume")
    for rank in range(nproc):
        r = json.loads((out / f"reshard_check_rank{rank}.json").read_text())
        assert r["resharded"] and r["compared"] > 0 and r["mismatched"] == [], r
        assert r["step"] == SAVED and r["optimizer_steps"] == r["saved_optimizer_steps"] == [float(SAVED)], r
        assert r["lr"] == r["saved_lr"], r
        assert r["rng_is_old_ranks"], r
