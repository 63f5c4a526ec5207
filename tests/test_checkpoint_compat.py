"""Checkpoints written before a change still resume and export.

`tests/fixtures/checkpoint_v1/` was written by the code of commit 094d891 (`make_checkpoint_v1.py` beside it):
a 2-rank, expert-parallel (ep 2) ZeRO-2 fp32 run of a very small MoE model, its step-2 checkpoint as `latest`,
the metrics that run logged for steps 1-4, and the logits its export code read from the step-2 weights.
Resuming it must repeat steps 3-4 bit for bit; exporting it must give the same logits, in our model and in
transformers' GptOss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch, read_metrics

from gptoss.export import export, read_export
from gptoss.generate import load_model, model_from_state_dict

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v1"
TRAIN = REPO / "launch" / "train.py"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A writable copy of the fixture (resume appends to metrics.jsonl and writes checkpoints)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    return tmp_path / "v1"


def expected() -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (FIXTURE / "expected_metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_old_checkpoint_resumes_bit_for_bit(old_run):
    proc = launch(TRAIN, "--ds_config", str(REPO / "ds_configs" / "cpu.json"), "--model", str(old_run / "model.json"),
                  "--data", str(old_run / "data"), "--out", str(old_run / "run"), "--max_steps", "4",
                  "--seq_len", "16", "--ep_size", "2", "--eval_every", "2", "--eval_batches", "2",
                  "--save_every", "2", "--keep_last", "0", "--log_every", "1", "--resume", nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = read_metrics(old_run / "run"), expected()
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # the training trajectory: bit for bit
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load", "tokens"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    # The evaluator now sums nats per target in float64 (for bits per byte) where it averaged float32 batch
    # means: the same windows and weights, so the same value up to float32 rounding.
    assert got[4]["val_loss"] == pytest.approx(want[4]["val_loss"], rel=1e-6, abs=0)
    assert (old_run / "run" / "checkpoints" / "latest").read_text() == "step00000004"


def test_old_checkpoint_exports_with_the_same_logits(old_run, tmp_path):
    ref = torch.load(FIXTURE / "expected_logits.pt")
    out = export(old_run / "run", tmp_path / "export", progress=False)
    cfg, state = read_export(out)
    ours = model_from_state_dict(cfg, state).float().eval()
    with torch.no_grad():
        assert torch.equal(ours(ref["input_ids"]).logits, ref["logits"])
        from_run = load_model(old_run / "run", device="cpu", dtype="fp32")  # consolidated in memory
        assert torch.equal(from_run(ref["input_ids"]).logits, ref["logits"])

    transformers = pytest.importorskip("transformers")
    hf, info = transformers.GptOssForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32,
                                                              attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ref["input_ids"]).logits, ref["logits"], atol=1e-4, rtol=0)
