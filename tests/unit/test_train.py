"""The training driver in one process on CPU: a real DeepSpeed engine (ZeRO-2, fp32) on the tiny model.

Runs go through `launch/train.py` in subprocesses (each owns its process group); the checks that stop
before any process group exists call `gptoss.train.main` in-process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CPU_CONFIG,
    REPO,
    TRAIN,
    call_main,
    cpu_env,
    launch,
    ok,
    read_metrics,
    signal_checkpoint,
    train_flags,
    wait_for_metrics,
)

from gptoss.config import get_config

STEPS = 8  # train_flags' default


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """One 8-step run shared by several tests: eval at 4 and 8, saves at 3, 6 and 8, keeps the last 2."""
    out = tmp_path_factory.mktemp("run") / "run"
    ok(launch(TRAIN, *train_flags(tiny_data, out)))
    return out


def test_loss_goes_down_and_metrics_have_the_fields(run):
    m = read_metrics(run)
    assert sorted(m) == list(range(1, STEPS + 1))
    for step, r in m.items():
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "mfu",
                    "expert_load", "mem_rss_gib", "skipped"):
            assert key in r, key
        assert r["tokens"] == step * 8 * 32  # global batch 8 x seq 32
        assert r["mfu"] is None  # no GPU peak to compare with
        assert not r["skipped"] and math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
        assert len(r["expert_load"]) == 2 and all(len(layer) == 4 for layer in r["expert_load"])
        assert all(sum(layer) == pytest.approx(1.0) for layer in r["expert_load"])
        assert r["aux_loss"] == pytest.approx(0.01 * 2, rel=0.2)  # coef x top-k when roughly balanced
    assert all(m[s]["elapsed_s"] < m[s + 1]["elapsed_s"] for s in range(1, STEPS))
    assert {s for s, r in m.items() if "val_loss" in r} == {4, 8}
    assert m[8]["val_ppl"] == pytest.approx(math.exp(m[8]["val_loss"]))
    assert m[8]["val_loss"] < m[4]["val_loss"]
    assert m[STEPS]["loss"] < m[1]["loss"] - 0.3
    # the LR warms up, then decays by the cosine towards cos_min_ratio x peak at the last step
    lrs = [m[s]["lr"] for s in sorted(m)]
    assert lrs[0] == pytest.approx(3e-4) and max(lrs) > 2e-3 and lrs[-1] == pytest.approx(3e-4)


def test_run_dir_and_checkpoint_layout(run):
    assert json.loads((run / "model_config.json").read_text())["vocab_size"] == 512
    run_args = json.loads((run / "run_args.json").read_text())
    assert run_args["total_steps"] == STEPS and run_args["gradient_accumulation_steps"] == 2
    assert run_args["ds_config"]["scheduler"]["params"]["total_num_steps"] == STEPS
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000008"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000006", "step00000008"]  # keep_last 2
    tag = ckpt / "step00000008"
    names = {p.name for p in tag.iterdir()}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank0_state.pt",
            "train_state.json"} <= names
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)} <= names
    state = json.loads((tag / "train_state.json").read_text())
    assert state["step"] == 8 and state["tokens"] == 8 * 256 and state["reason"] == "final"
    assert state["world_size"] == 1 and state["ep_size"] == 1 and state["model_config"]["vocab_size"] == 512
    mine = torch.load(tag / "rank0_state.pt", weights_only=False)
    assert mine["step"] == 8 and mine["sampler"]["step"] == 8
    assert set(mine["rng"]) == {"python", "numpy", "torch", "accelerator"}
    client = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["step"] == 8 and client["sampler"]["step"] == 8  # DeepSpeed's client_state


def test_resume_continues_bit_for_bit(run, tiny_data, tmp_path):
    """Pretend the run died after step 6: the resumed steps 7-8 equal the uninterrupted ones exactly."""
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step00000008")
    (out / "checkpoints" / "latest").write_text("step00000006")
    ok(launch(TRAIN, *train_flags(tiny_data, out, "--resume")))
    full, resumed = read_metrics(run), read_metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # records past step 6 were replaced, not duplicated
    for step in (7, 8):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert resumed[8]["val_loss"] == full[8]["val_loss"]
    assert resumed[7]["elapsed_s"] > full[6]["elapsed_s"]  # training seconds carry over from the checkpoint


def test_resume_of_a_finished_run_does_nothing(run, tiny_data, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(run, out)
    ok(launch(TRAIN, *train_flags(tiny_data, out, "--resume")))
    assert read_metrics(out) == read_metrics(run)


# ---- user errors: one line on stderr, exit 2, before any process group ------------------------------------

@pytest.mark.parametrize("world,ds,overrides,match", [
    (2, {"train_micro_batch_size_per_gpu": 3}, {},
     "train_batch_size=8 is not divisible by train_micro_batch_size_per_gpu=3 x world size 2 = 6"),
    (1, {"gradient_accumulation_steps": 2}, {}, "remove gradient_accumulation_steps"),
    (1, None, {"seq_len": 512}, "exceeds the model's context max_position_embeddings=256"),
    (1, None, {"model": "tiny"}, "vocab_size 512"),
    (2, {"zero_optimization": {"stage": 3}}, {}, "do not support ZeRO-3"),
    (1, {"zero_optimization": {"stage": 0}}, {}, "use stage 1 or 2"),
    (2, None, {"ep_size": 3}, "does not divide num_local_experts=4"),
    (1, None, {"ep_size": 2}, "does not divide the world size 1"),
    (1, None, {"tokens": 1000}, "exactly one of --tokens N or --max_steps N"),
    (1, None, {"ds_config": "nope.json"}, "nope.json: file not found"),
    (1, None, {"model": "huge"}, "not a preset"),
    (1, None, {"data": "/nonexistent"}, "meta.json not found"),
    (1, None, {"resume": True}, "no checkpoint to resume"),
    (1, None, {"attn_impl": "fast"}, "--attn_impl=fast: expected one of auto, flex, cpu, eager"),
])
def test_user_errors_are_one_line(capsys, monkeypatch, tiny_data, tmp_path, world, ds, overrides, match):
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", ds, world, **overrides)
    assert match in line


def test_resume_refuses_other_model_batch_or_seq_len(capsys, monkeypatch, run, tiny_data, tmp_path):
    other = tmp_path / "other.json"
    cfg = json.loads((tiny_data / "model.json").read_text())
    other.write_text(json.dumps({**cfg, "hidden_size": 128}))
    line = call_main(capsys, monkeypatch, tiny_data, run, model=str(other), resume=True)
    assert "another model config (hidden_size: 64 -> 128)" in line
    line = call_main(capsys, monkeypatch, tiny_data, run, {"train_batch_size": 16}, resume=True)
    assert "train_batch_size 8 -> 16" in line  # another world size or --ep_size reshards: tests/system/test_reshard
    line = call_main(capsys, monkeypatch, tiny_data, run, seq_len=16, resume=True)
    assert "seq_len 32 -> 16" in line
    line = call_main(capsys, monkeypatch, tiny_data, run)  # a new run into a dir with checkpoints
    assert "already holds checkpoints" in line


def test_other_format_versions_are_refused_in_one_line(capsys, monkeypatch, run, tiny_data, tmp_path):
    """meta.json carries format_version 1, train_state.json 2 (1 held a data vocabulary's head without pad rows);
    another number, or none, names the file, the version found and the one expected."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    meta = json.loads((data / "meta.json").read_text())
    for version in (0, None):
        (data / "meta.json").write_text(json.dumps({**meta, "format_version": version}))
        line = call_main(capsys, monkeypatch, data, tmp_path / "out")
        assert f"{data / 'meta.json'}: format_version {version}, this gptoss reads format_version 1" in line
    out = Path(shutil.copytree(run, tmp_path / "run"))
    state_file = out / "checkpoints" / "step00000008" / "train_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "format_version": 1}))
    line = call_main(capsys, monkeypatch, tiny_data, out, resume=True)
    assert line == f"train.py: error: {state_file}: format_version 1, this gptoss reads format_version 2"


def test_resume_keeps_story_awareness(capsys, monkeypatch, run, tiny_data):
    line = call_main(capsys, monkeypatch, tiny_data, run, resume=True, attend_across_stories=True)
    assert "written with another layout (story_aware True -> False)" in line


@pytest.mark.parametrize("ds_name, world, micro_accum", [
    ("a40.json", 1, (16, 4)), ("a40.json", 4, (16, 1)),  # one A40, or the same global batch on four GPUs
    ("multinode.json", 16, (16, 2)), ("multinode.json", 32, (16, 1)),  # 2 and 4 nodes of 8 GPUs, ep 8
])
def test_shipped_configs_plan_at_their_world_sizes(monkeypatch, tiny_data, tmp_path, ds_name, world, micro_accum):
    """The shipped DeepSpeed configs pass every check (DeepSpeed's own included) at the world sizes their
    comments promise; --tokens sets the step count and the schedule length from the global batch."""
    from gptoss.train import TrainArgs, plan_run

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    model = tmp_path / "model8.json"  # tiny with nano's 8 experts, so ep 8 divides them
    get_config(str(tiny_data / "model.json"), num_local_experts=8).save(model)
    plan = plan_run(TrainArgs(ds_config=str(REPO / "ds_configs" / ds_name), model=str(model), data=str(tiny_data),
                              out=str(tmp_path / "out"), tokens=10_000, seq_len=32))
    assert (plan.micro, plan.accum) == micro_accum
    assert plan.ep_size == (8 if ds_name == "multinode.json" else 1)
    tokens_per_step = plan.global_batch * 32
    assert plan.total_steps == math.ceil(10_000 / tokens_per_step)
    assert plan.ds_config["scheduler"]["params"]["total_num_steps"] == plan.total_steps
    assert plan.ds_config["bf16"]["enabled"] and plan.ds_config["zero_optimization"]["stage"] == 2


def test_ranks_split_one_global_batch(tiny_data):
    """Every rank slices its micro-batches out of the same global draw: disjoint slices that together are
    exactly the global batch, so the data seen per step does not depend on the world size."""
    from types import SimpleNamespace

    from gptoss.data import BatchSampler, TokenDataset
    from gptoss.train import my_rows

    data = TokenDataset(tiny_data, "train", seq_len=32)
    whole = BatchSampler(data, 8, seed=5).next_batch()
    for world, micro in ((1, 4), (2, 2), (4, 1), (2, 4)):
        accum = 8 // (micro * world)
        rows = []
        for rank in range(world):
            plan = SimpleNamespace(micro=micro, accum=accum, rank=rank, train_data=data)
            micro_batches = my_rows(BatchSampler(data, 8, seed=5), plan)
            assert len(micro_batches) == accum and all(len(x) == micro for x, _ in micro_batches)
            rows += micro_batches
        assert torch.equal(torch.cat([x for x, _ in rows]), whole[0])
        assert torch.equal(torch.cat([y for _, y in rows]), whole[1])


def test_cli_error_has_no_traceback(tiny_data, tmp_path):
    proc = launch(TRAIN, *train_flags(tiny_data, tmp_path / "x", "--seq_len", "100000"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["train.py: error: --seq_len=100000 exceeds the model's context max_position_embeddings=256"]


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, env=cpu_env())
    assert proc.returncode == 0
    for flag in ("--ds_config", "--model", "--data", "--out", "--tokens", "--max_steps", "--seq_len", "--ep_size",
                 "--seed", "--resume", "--wandb", "--eval_every", "--eval_batches", "--save_every", "--keep_last",
                 "--log_every", "--max_bad_steps", "--timeout_min", "--verify_data", "--attn_impl", "--local_rank"):
        assert flag in proc.stdout, flag


# ---- faults --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_and_exits_zero(tiny_data, tmp_path, signum):
    """Slurm's preemption / time-limit warning: finish the step, save, exit 0; the checkpoint resumes."""
    out = tmp_path / "term"
    cmd = [sys.executable, str(TRAIN), *train_flags(tiny_data, out, "--save_every", "0", steps=5000)]
    log = tmp_path / "term.log"
    with log.open("w") as f:  # a file, not a pipe: nobody reads a pipe while the run goes on
        proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for_metrics(out, proc, 2)
            os.kill(proc.pid, signum)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    _, state = signal_checkpoint(out, proc, log)
    assert 2 <= state["step"] < 5000 and max(read_metrics(out)) == state["step"]
    # the checkpoint resumes (a shorter schedule, just to see it load and take one more step)
    ok(launch(TRAIN, *train_flags(tiny_data, out, "--resume", "--save_every", "0", steps=state["step"] + 1)))
    assert max(read_metrics(out)) == state["step"] + 1


def test_real_tokenizer_sample_with_the_tiny_preset(tmp_path):
    """The quickstart path: synthetic stories (o200k_harmony, 201k vocab) and the tiny preset."""
    from gptoss.data import prepare_dataset

    prepare_dataset(out_dir=tmp_path / "sample", synthetic=40)
    out = tmp_path / "q"
    ok(launch(TRAIN, "--ds_config", str(CPU_CONFIG), "--model", "tiny", "--data", str(tmp_path / "sample"),
              "--out", str(out), "--max_steps", "2", "--seq_len", "32", "--eval_every", "2", "--eval_batches", "1",
              "--log_every", "1"))
    m = read_metrics(out)
    assert sorted(m) == [1, 2] and "val_loss" in m[2]
    # bits per byte: the summed loss in bits over the bytes of the same targets (val.bin's ids decode to text)
    assert m[2]["val_bpb"] > 0 and math.isfinite(m[2]["val_bpb"])
    state = json.loads((out / "checkpoints" / "step00000002" / "train_state.json").read_text())
    assert state["story_aware"] is True  # the default: attention stays inside each story
    # The same run with attention across stories sees the same batches (the windows hold <|endoftext|>) but
    # computes another loss from step 1 on.
    across = tmp_path / "across"
    ok(launch(TRAIN, "--ds_config", str(CPU_CONFIG), "--model", "tiny", "--data", str(tmp_path / "sample"),
              "--out", str(across), "--max_steps", "1", "--seq_len", "32", "--eval_every", "0",
              "--log_every", "1", "--attend_across_stories"))
    assert read_metrics(across)[1]["loss"] != m[1]["loss"]
    saved = json.loads((across / "checkpoints" / "step00000001" / "train_state.json").read_text())
    assert saved["story_aware"] is False
    assert m[1]["loss"] == pytest.approx(math.log(201088), abs=0.5)  # near uniform at init
