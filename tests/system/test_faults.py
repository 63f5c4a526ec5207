"""Fault injection on CPU: each fault is done for real, then we check that nothing was lost and that the message
is one clear line naming the file or key and the fix.

    config   unknown DeepSpeed / gptoss keys (with "did you mean"); the rest of plan_run's checks (batch
             arithmetic, vocab, context, ep_size, ZeRO-3) are in test_train.py::test_user_errors_are_one_line
    data     truncated .bin, flipped bytes (--verify_data), ids outside the vocabulary, empty validation split
    save     SIGKILL in the middle of writing a checkpoint file; a broken `latest`; pruning along the run's chain
    numbers  NaN losses are skipped, then the run stops with the last good weights; a finite loss with an inf/NaN
             gradient (dense and expert parameters) is skipped and counted, and training goes on unharmed
    ranks    a rank killed under torchrun; a rank that dies or hangs under a launcher that does not watch its
             children (srun): the other fails within --timeout_min instead of waiting forever
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import KeysView
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CPU_CONFIG,
    REPO,
    TRAIN,
    call_main,
    cpu_env,
    free_port,
    launch,
    ok,
    rank_command,
    read_metrics,
    train_flags,
    wait_for_metrics,
)

from gptoss.train import DS_CONFIG_KEYS, TrainArgs, plan_run


def error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The CLI's one `train.py: error:` line, after checking the exit status and that no traceback was printed."""
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of tiny_data to damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def edit_meta(data_dir: Path, split: str, **changes) -> None:
    """Change one split's entry in meta.json; a value of None removes the key."""
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["splits"][split].update(changes)
    meta["splits"][split] = {k: v for k, v in meta["splits"][split].items() if v is not None}
    (data_dir / "meta.json").write_text(json.dumps(meta))


def plan_ok(monkeypatch: pytest.MonkeyPatch, data_dir: Path, out: Path, **overrides) -> None:
    """plan_run (every check that needs no process group) passes."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    kwargs = dict(ds_config=str(CPU_CONFIG), model=str(data_dir / "model.json"),
                  data=str(data_dir), out=str(out), max_steps=4, seq_len=32, eval_every=2, eval_batches=2)
    plan_run(TrainArgs(**{**kwargs, **overrides}))


# ---- config ------------------------------------------------------------------------------------------------

def test_unknown_config_keys_are_refused_with_a_suggestion(capsys, monkeypatch, tiny_data, tmp_path):
    """DeepSpeed ignores unknown top-level keys: a typo would silently train with a default batch or no ZeRO."""
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"train_batch_szie": 8, "zero_optimisation": {}})
    assert ("unknown DeepSpeed key(s): 'train_batch_szie' (did you mean 'train_batch_size'?), 'zero_optimisation' "
            "(did you mean 'zero_optimization'?); DeepSpeed would silently ignore them") in line
    assert "prefix it with '_'" in line  # the fix, for a key meant as a note
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"my_notes": 1})
    assert "'my_notes';" in line and "did you mean" not in line
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"gptoss": {"ep_szie": 2}})
    assert "unknown key(s) in the 'gptoss' section: 'ep_szie' (did you mean 'ep_size'?); known: ep_size" in line


def test_nested_deepspeed_config_errors_are_one_line_before_any_process_group(capsys, monkeypatch, tiny_data,
                                                                              tmp_path):
    """DeepSpeed's section models refuse unknown keys only inside initialize, on every rank, as a traceback."""
    zero = json.loads(CPU_CONFIG.read_text())["zero_optimization"]
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out",
                     {"zero_optimization": {**zero, "overlap_com": True}})
    assert line.endswith("unknown DeepSpeed key 'zero_optimization.overlap_com' (did you mean 'overlap_comm'?)")
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"bf16": {"enable": True}})
    assert line.endswith("unknown DeepSpeed key 'bf16.enable' (did you mean 'enabled'?)")
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out",
                     {"zero_optimization": {**zero, "offload_optimizer": {"device": "cpu", "pin_memroy": True}}})
    assert line.endswith("'zero_optimization.offload_optimizer.pin_memroy' (did you mean 'pin_memory'?)")
    # a bad value is named by its own section, even where another section has the same key
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"bf16": {"enabled": "maybe"},
                                                                         "fp16": {"enabled": False}})
    assert "bf16.enabled: Input should be a valid boolean" in line and "(got 'maybe')" in line
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"zero_optimization": {"stage": "two"}})
    assert "zero_optimization.stage: Input should be 0, 1, 2, 3" in line
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {"bf16": {"enabled": True},
                                                                         "fp16": {"enabled": True}})
    assert "DeepSpeed rejects it: bfloat16 and fp16 modes cannot be simultaneously enabled" in line


def test_ds_config_keys_cover_what_deepspeed_reads(monkeypatch):
    """DS_CONFIG_KEYS is a snapshot; re-derive it from the installed DeepSpeed so an upgrade that reads a new key
    fails here instead of refusing a valid config."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    read: set[str] = set()

    class Recording(dict):
        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def keys(self):
            return KeysView(self)  # `KEY in d.keys()` goes through __contains__

        def __copy__(self):
            return Recording(self)

    cfg = {k: v for k, v in json.loads(CPU_CONFIG.read_text()).items() if k[0] != "_"}
    DeepSpeedConfig(Recording(cfg))
    assert {"train_batch_size", "zero_optimization", "bf16", "tensorboard"} <= read  # the recording works
    assert read - DS_CONFIG_KEYS == set()


# ---- data --------------------------------------------------------------------------------------------------

def test_prepare_records_the_largest_id(tmp_path, monkeypatch):
    """meta.json's max_token_id is what lets every run refuse out-of-vocabulary data without reading it."""
    import datasets

    from gptoss.data import prepare_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    src = tmp_path / "stories.txt"
    src.write_text("".join(f"Story {i}: a cat sat on a mat.\n<|endoftext|>\n" for i in range(4)))
    meta = prepare_dataset(str(src), tmp_path / "out", num_proc=1)
    for split, info in meta["splits"].items():
        assert info["max_token_id"] == int(np.fromfile(tmp_path / "out" / info["file"], dtype="<u4").max()), split


def test_truncated_bin_is_one_line_exit_2(data, tmp_path):
    train = data / "train.bin"
    size = train.stat().st_size
    train.write_bytes(train.read_bytes()[:-6])  # a copy that stopped mid-token
    line = error_line(launch(TRAIN, *train_flags(data, tmp_path / "run")))
    assert line == (f"train.py: error: {train} is {size - 6} bytes, not a whole number of uint32 tokens, "
                    f"expected {size} (8192 uint32 tokens per meta.json): truncated or corrupted, re-run "
                    "prepare_data.py --force")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_flipped_bytes_are_caught_by_verify_data(capsys, monkeypatch, data, tmp_path):
    """Same size, ids still inside the vocabulary: only the sha256 can tell, so --verify_data reads the files."""
    val = data / "val.bin"
    ids = np.fromfile(val, dtype="<u4")
    ids[100:104] ^= 1
    ids.tofile(val)
    plan_ok(monkeypatch, data, tmp_path / "a")  # the cheap checks cannot see it
    line = call_main(capsys, monkeypatch, data, tmp_path / "b", verify_data=True)
    assert f"{val} has sha256 " in line and "meta.json says" in line
    assert line.endswith("the file changed since it was prepared (corrupted or overwritten); re-run "
                         "prepare_data.py --force")


def test_token_ids_outside_the_vocabulary(capsys, monkeypatch, data, tmp_path):
    """Model and meta agree on 512 ids but the file holds 9999 (another tokenizer, or corruption)."""
    train = data / "train.bin"
    ids = np.fromfile(train, dtype="<u4")
    ids[::16] = 9999  # in every window of 33 tokens
    ids.tofile(train)
    # meta.json records the largest id: refused at open, without reading the file
    edit_meta(data, "train", max_token_id=9999)
    line = call_main(capsys, monkeypatch, data, tmp_path / "a")
    assert ("split 'train' holds token ids up to 9999 (max_token_id), outside the vocabulary of 512: tokenized "
            "with another tokenizer or corrupted; re-run prepare_data.py --force") in line
    # a meta.json that understates the largest id: --verify_data scans the ids
    edit_meta(data, "train", max_token_id=511)
    line = call_main(capsys, monkeypatch, data, tmp_path / "b", verify_data=True)
    assert f"{train} has sha256" in line  # the digest fails first; with a matching digest, the id scan:
    edit_meta(data, "train", sha256=hashlib.sha256(train.read_bytes()).hexdigest())
    line = call_main(capsys, monkeypatch, data, tmp_path / "c", verify_data=True)
    assert f"{train}: token id 9999 at position 0 is outside the vocabulary of 512" in line
    # and without it, the first batch that holds one stops training: no garbage step, no crash in the embedding
    line = error_line(launch(TRAIN, *train_flags(data, tmp_path / "run")))
    assert f"{train}: token id 9999 at position " in line and "outside the vocabulary of 512" in line
    assert not (tmp_path / "run" / "checkpoints").exists() and not read_metrics(tmp_path / "run")


def test_empty_validation_split_with_eval_on(capsys, monkeypatch, data, tmp_path):
    (data / "val.bin").write_bytes(b"")
    edit_meta(data, "val", tokens=0, max_token_id=-1)
    line = call_main(capsys, monkeypatch, data, tmp_path / "a")
    assert line == (f"train.py: error: {data / 'val.bin'}: split 'val' has 0 tokens, fewer than one window of "
                    "seq_len+1 = 33; use a smaller seq_len or more data (validation is on: --eval_every 0 trains "
                    "without it)")
    plan_ok(monkeypatch, data, tmp_path / "b", eval_every=0)
    meta = json.loads((data / "meta.json").read_text())
    del meta["splits"]["val"]
    (data / "meta.json").write_text(json.dumps(meta))
    line = call_main(capsys, monkeypatch, data, tmp_path / "c")
    assert "has no split 'val'; splits: ['train'] (validation is on: --eval_every 0 trains without it)" in line


# ---- checkpoints -------------------------------------------------------------------------------------------

SAVE_KILL_WRAPPER = """
import io, os, signal, sys
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
tag, after, written, save = os.environ["KILL_TAG"], int(os.environ["KILL_AFTER"]), [0], TorchCheckpointEngine.save
def dying_save(self, state_dict, path):
    if tag in str(path):
        written[0] += 1
        if written[0] > after:  # half of this file, then the process is gone, as on a node losing power
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return save(self, state_dict, path)
TorchCheckpointEngine.save = dying_save
from gptoss.train import arg_parser, args_from_namespace, main
sys.exit(main(args_from_namespace(arg_parser().parse_args())))
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    """SIGKILL after DeepSpeed wrote 3 files of step 6 and half of the 4th: `latest` still names step 3, whose
    files load, and --resume redoes steps 4-6 exactly and finishes."""
    wrapper = tmp_path / "dying_save.py"
    wrapper.write_text(SAVE_KILL_WRAPPER)
    out = tmp_path / "run"
    proc = launch(wrapper, *train_flags(tiny_data, out), env=cpu_env(KILL_TAG="step00000006", KILL_AFTER="3"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000003"
    partial = ckpt / "step00000006"
    assert partial.is_dir() and not (partial / "train_state.json").exists()  # never mistaken for a checkpoint
    good = ckpt / "step00000003"
    assert json.loads((good / "train_state.json").read_text())["step"] == 3
    for f in good.glob("*.pt"):
        torch.load(f, weights_only=False)  # every file of the committed checkpoint is whole
    before = read_metrics(out)
    assert sorted(before) == list(range(1, 7))  # step 6 was logged, then the save died

    ok(launch(TRAIN, *train_flags(tiny_data, out, "--resume")))
    after = read_metrics(out)
    assert sorted(after) == list(range(1, 9))
    for step in range(1, 7):  # replayed from step 3, bit for bit: nothing lost, nothing changed
        for key in ("loss", "grad_norm", "lr", "expert_load"):
            assert after[step][key] == before[step][key], (step, key)
    assert (ckpt / "latest").read_text() == "step00000008"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000006", "step00000008"]  # keep_last 2
    assert {p.name for p in partial.iterdir()} == {p.name for p in (ckpt / "step00000008").iterdir()}
    for f in partial.glob("*.pt"):
        torch.load(f, weights_only=False)  # step 6 was saved again from scratch, the half file is gone


def test_resume_refuses_a_broken_latest(capsys, monkeypatch, tiny_data, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    (ckpt / "latest").write_text("")
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "run", resume=True)
    assert f"{ckpt / 'latest'} is empty; write the tag of a complete checkpoint into it" in line
    (ckpt / "latest").write_text("step00000004")  # names the remains of an interrupted save
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "run", resume=True)
    assert f"{ckpt / 'step00000004'} is not a complete gptoss checkpoint" in line


def test_keep_last_prunes_only_along_the_runs_chain(capsys, monkeypatch, tiny_data, tmp_path):
    """Issue 21 item 6 at tiny scale: saves at 2, 4, 5 and 6 (5 plays the signal save), then --resume_from step 4
    with --keep_last 2. The new save at 6 replaces the old one, keeps step 4 (its parent) and prunes step 2 along
    the chain; step 5, abandoned, is left alone and is never offered in place of a damaged checkpoint."""
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    flags = ("--eval_every", "0", "--save_every", "2", "--keep_last", "0")
    ok(launch(TRAIN, *train_flags(tiny_data, out, *flags, steps=5)))
    ok(launch(TRAIN, *train_flags(tiny_data, out, *flags, "--resume", steps=6)))
    assert sorted(p.name for p in ckpt.glob("step*")) == [f"step0000000{s}" for s in (2, 4, 5, 6)]
    ok(launch(TRAIN, *train_flags(tiny_data, out, *flags[:-1], "2", "--resume_from", "step00000004", steps=6)))
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000005", "step00000006"]
    assert json.loads((ckpt / "step00000006" / "train_state.json").read_text())["parent"] == "step00000004"
    (ckpt / "step00000006" / "rank0_state.pt").unlink()
    line = call_main(capsys, monkeypatch, tiny_data, out, resume=True, max_steps=6)
    assert line.endswith("the newest older checkpoint that verifies is step00000004: resume from it with "
                         "--resume_from step00000004"), line


# ---- numbers -----------------------------------------------------------------------------------------------

NAN_WRAPPER = """
import os, sys
import gptoss.model.gptoss as m
bad = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
accum, calls, forward = int(os.environ["ACCUM"]), [0], m.GptOss.forward
def poisoned(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        if (calls[0] - 1) // accum + 1 in bad and (calls[0] - 1) % accum == 0:  # first micro-batch of the step
            out.loss = out.loss * float("nan")
    return out
m.GptOss.forward = poisoned
from gptoss.train import arg_parser, args_from_namespace, main
sys.exit(main(args_from_namespace(arg_parser().parse_args())))
"""


def test_nonfinite_steps_are_skipped_then_training_stops(tiny_data, tmp_path):
    """NaN losses at steps 3 and 5-7: step 3 is skipped (weights, Adam and LR schedule untouched) and training
    goes on; 3 bad steps in a row stop it with exit 3 and a checkpoint that holds the step-4 weights."""
    wrapper = tmp_path / "nan_train.py"
    wrapper.write_text(NAN_WRAPPER)
    out = tmp_path / "nan"
    flags = train_flags(tiny_data, out, "--max_bad_steps", "3", "--save_every", "4", "--keep_last", "0",
                        "--eval_every", "0", steps=10)
    proc = launch(wrapper, *flags, env=cpu_env(NAN_STEPS="3,5,6,7", ACCUM="2"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "stopped after 3 consecutive non-finite steps" in proc.stderr
    m = read_metrics(out)
    assert sorted(m) == list(range(1, 8))
    assert [s for s in m if m[s]["skipped"]] == [3, 5, 6, 7]
    assert m[3]["loss"] is None and m[3]["grad_norm"] is None  # NaN/inf written as null
    assert m[4]["lr"] == m[3]["lr"]  # the skipped step did not advance the schedule
    assert m[5]["lr"] == m[6]["lr"] == m[7]["lr"]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000007"
    assert json.loads((ckpt / "step00000007" / "train_state.json").read_text())["reason"] == "non-finite"
    at4 = torch.load(ckpt / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    at7 = torch.load(ckpt / "step00000007" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert at4.keys() == at7.keys() and all(torch.equal(at4[k], at7[k]) for k in at4)


GRAD_WRAPPER = """
import os, sys
import gptoss.train.loop as t  # the loop looks build_engine and train_step up in its own module
# GRAD_FAULTS="3:inf:lm_head.weight,6:nan:gate_up_proj": at step 3 one element of the first matching parameter's
# gradient becomes inf, in the step's first micro-batch only (the loss stays finite).
faults = {int(s): (float(v), suffix) for s, v, suffix in (f.split(":") for f in os.environ["GRAD_FAULTS"].split(","))}
build_engine, train_step, step, fired = t.build_engine, t.train_step, [0], [False]
def poison_at(name):
    def hook(grad):
        value, suffix = faults.get(step[0], (None, None))
        if fired[0] or suffix is None or not name.endswith(suffix):
            return grad
        fired[0] = True
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad
    return hook
def hooked(plan):
    engine = build_engine(plan)
    params = dict(engine.module.named_parameters())
    for _, suffix in faults.values():
        name = next(n for n in params if n.endswith(suffix))
        params[name].register_hook(poison_at(name))
    return engine
def counted(*args, **kwargs):
    step[0] += 1
    fired[0] = False
    return train_step(*args, **kwargs)
t.build_engine, t.train_step = hooked, counted
from gptoss.train import arg_parser, args_from_namespace
sys.exit(t.main(args_from_namespace(arg_parser().parse_args())))
"""


def test_nonfinite_gradient_with_finite_loss_is_skipped(tiny_data, tmp_path):
    """The loss is finite but one gradient element is not: inf in the unembedding at step 3, NaN in an expert's
    weights (DeepSpeed's separate MoE parameter group) at step 6, each in the first of the step's two
    micro-batches only. Both steps are skipped and counted, the weights, the LR schedule and Adam's moments are
    left as they were, training goes on with finite losses and the run finishes with exit 0."""
    wrapper = tmp_path / "grad_train.py"
    wrapper.write_text(GRAD_WRAPPER)
    out = tmp_path / "grad"
    flags = train_flags(tiny_data, out, "--max_bad_steps", "2", "--save_every", "1", "--keep_last", "0",
                        "--eval_every", "0", steps=10)
    proc = ok(launch(wrapper, *flags, env=cpu_env(GRAD_FAULTS="3:inf:lm_head.weight,6:nan:gate_up_proj")))
    assert "step 3 skipped" in proc.stderr and "step 6 skipped" in proc.stderr, proc.stderr[-3000:]
    m = read_metrics(out)
    assert sorted(m) == list(range(1, 11))
    assert [s for s in m if m[s]["skipped"]] == [3, 6]
    assert [m[s]["skipped_total"] for s in m] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    for s in (3, 6):
        assert m[s]["loss"] is not None and m[s]["grad_norm"] is None  # finite loss; inf norm written as null
        assert m[s + 1]["lr"] == m[s]["lr"]  # the skipped step did not advance the schedule
    assert all(m[s]["grad_norm"] is not None for s in m if s not in (3, 6))
    assert all(m[s]["loss"] < m[1]["loss"] for s in range(7, 11))  # later steps still learn

    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000010"

    def states(step: int) -> dict[str, torch.Tensor]:
        """Every tensor of a checkpoint's model and optimizer files (dense and expert), by file and key path."""
        found = {}

        def walk(prefix: str, obj) -> None:
            if isinstance(obj, torch.Tensor):
                found[prefix] = obj
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}/{k}", v)
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(f"{prefix}/{i}", v)

        for f in sorted((ckpt / f"step{step:08d}").glob("*.pt")):
            if not f.name.startswith("rank"):  # rank*_state.pt: RNG and sampler, which do move on
                walk(f.name, torch.load(f, weights_only=False))
        return found

    for bad in (3, 6):
        before, at = states(bad - 1), states(bad)
        assert before.keys() == at.keys() and len(before) > 10
        assert all(torch.equal(before[k], at[k]) for k in before), bad
        after = states(bad + 1)
        assert any(not torch.equal(at[k], after[k]) for k in at if "module" in k)  # the next step trains


# ---- ranks -------------------------------------------------------------------------------------------------

def rank_flags(data: Path, out: Path, *extra: str, steps: int = 5000) -> list[str]:
    """A long 2-rank run, saving every 3 steps; the tests stop it."""
    return train_flags(data, out, "--eval_every", "0", "--keep_last", "2", *extra, steps=steps)


def check_checkpoint(ckpt: Path, world: int) -> int:
    """`latest` names a complete checkpoint whose files all load; returns its step."""
    tag = (ckpt / "latest").read_text()
    state = json.loads((ckpt / tag / "train_state.json").read_text())
    assert tag == f"step{state['step']:08d}" and state["world_size"] == world
    assert {f"rank{r}_state.pt" for r in range(world)} <= {p.name for p in (ckpt / tag).iterdir()}
    for f in (ckpt / tag).glob("*.pt"):
        torch.load(f, weights_only=False)
    return state["step"]


@pytest.mark.slow
def test_killed_rank_fails_torchrun_and_the_checkpoint_resumes(tiny_data, tmp_path):
    """SIGKILL one of two ranks mid-training: torchrun stops the other and exits non-zero at once; the last
    checkpoint is whole and a 2-rank --resume continues from it with the logged history intact."""
    import psutil

    out = tmp_path / "run"
    log = tmp_path / "run.log"
    with log.open("w") as f:  # a file, not a pipe: nobody reads a pipe while the run goes on
        proc = subprocess.Popen(rank_command(TRAIN, *rank_flags(tiny_data, out), nproc=2), cwd=REPO,
                                env=cpu_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for_metrics(out, proc, 5)  # step 3's save is done
            rank1 = next(p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1")
            rank1.kill()
            proc.wait(timeout=120)  # the bound: torchrun notices within a second or so
        finally:
            proc.kill()
    assert proc.returncode not in (0, None), log.read_text()[-3000:]
    step = check_checkpoint(out / "checkpoints", world=2)
    before = read_metrics(out)
    ok(launch(TRAIN, *rank_flags(tiny_data, out, "--resume", steps=step + 2), nproc=2))
    after = read_metrics(out)
    assert sorted(after) == list(range(1, step + 3))  # records past the checkpoint were replaced, not duplicated
    assert all(after[s] == before[s] for s in range(1, step + 1))
    assert check_checkpoint(out / "checkpoints", world=2) == step + 2


FAULTY_RANK_WRAPPER = """
import os, signal, sys
import torch.distributed as dist
import gptoss.train.loop as t  # the loop looks train_step up in its own module
after, fault = int(os.environ["FAULT_AFTER_STEPS"]), os.environ["FAULT"]
all_reduce, train_step, steps = dist.all_reduce, t.train_step, [0]
def counted(*args, **kwargs):
    stats = train_step(*args, **kwargs)
    steps[0] += 1
    return stats
def faulty(tensor, *args, group=None, **kwargs):  # DeepSpeed's gradient reduction runs on its own groups
    if steps[0] >= after and group not in (None, dist.group.WORLD) and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
    return all_reduce(tensor, *args, group=group, **kwargs)
t.train_step, dist.all_reduce = counted, faulty
from gptoss.train import arg_parser, args_from_namespace
sys.exit(t.main(args_from_namespace(arg_parser().parse_args())))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_lost_rank_fails_the_other_within_the_timeout(tiny_data, tmp_path, fault):
    """Two ranks started side by side as srun does (no torchrun watching them). After 4 steps, rank 1 dies
    (SIGKILL) or hangs (SIGSTOP: a stuck GPU or filesystem, its sockets stay open) as it enters DeepSpeed's
    gradient all-reduce. Rank 0 must not wait forever: it exits 4 within --timeout_min, with one line naming
    the checkpoint to resume. (That all-reduce runs on a DeepSpeed process group, which keeps torch's 30-minute
    default unless the trainer passes --timeout_min on to every group.)"""
    wrapper = tmp_path / "faulty_rank.py"
    wrapper.write_text(FAULTY_RANK_WRAPPER)
    out, port, timeout_min = tmp_path / "run", str(free_port()), 0.5
    flags = rank_flags(tiny_data, out, "--timeout_min", str(timeout_min))
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    try:
        for r in range(2):
            env = cpu_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          FAULT=fault, FAULT_AFTER_STEPS="4")
            with logs[r].open("w") as f:  # files, not pipes: nobody reads a pipe while the run goes on
                procs.append(subprocess.Popen([sys.executable, str(wrapper), *flags], cwd=REPO, env=env, stdout=f,
                                              stderr=subprocess.STDOUT))
        procs[0].wait(timeout=timeout_min * 60 + 240)  # the bound; without it: 30 minutes
    finally:
        for p in procs:
            p.kill()
            p.wait()
    text = logs[0].read_text()
    assert procs[0].returncode == 4, text[-3000:]
    assert max(read_metrics(out)) == 4
    assert check_checkpoint(out / "checkpoints", world=2) == 3  # the last save before the fault, whole
    errors = [line for line in text.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert errors[0].startswith("train.py: error: rank 0 lost the other ranks (")
    assert errors[0].endswith("a rank died or hung longer than --timeout_min=0.5; fix the cause and restart with "
                              "--resume (latest checkpoint: step00000003)")
    if fault == "hangs":
        assert "Timed out" in errors[0]
