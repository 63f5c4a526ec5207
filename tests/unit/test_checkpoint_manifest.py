"""Checkpoints that prove themselves, with real files and real damage (no mocks).

    manifest   every save lists every file of its tag with size, crc32 and the rank that wrote it (2 ranks: each
               rank describes its own files)
    resume     a truncated file, a flipped byte (--verify_checkpoint), a missing expert file, a missing rank file:
               --resume refuses in one line naming the file, expected and found, and the newest older tag that
               verifies; --resume_from that tag then continues bit for bit
    export     the same refusals from export and from the in-memory reader that sampling uses
    lock       a second training process on a running run's --out exits 2 at once, naming the holder
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TRAIN,
    call_main,
    cpu_env,
    launch,
    no_partial_dirs,
    ok,
    rank_command,
    read_metrics,
    train_flags,
    wait_for_metrics,
)

from gptoss.checkpoint.lock import acquire_run_lock
from gptoss.checkpoint.manifest import verify
from gptoss.errors import CheckpointError
from gptoss.export import export, load_state_dict

EXPORT = REPO / "launch" / "export.py"
LATEST, OLDER = "step00000008", "step00000006"  # train_flags' 8 steps save at 3, 6 and 8 and keep the last 2


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest_run") / "run"
    ok(launch(TRAIN, *train_flags(tiny_data, out)))
    return out


@pytest.fixture
def damaged(run, tmp_path) -> Path:
    """A copy of the run, to damage its latest checkpoint."""
    return Path(shutil.copytree(run, tmp_path / "damaged"))


def one_error_line(proc: subprocess.CompletedProcess, script: str) -> str:
    """Exit 2, no traceback, exactly one `script: error:` line on stderr."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def manifest_files(tag_dir: Path) -> dict[str, dict]:
    return json.loads((tag_dir / "train_state.json").read_text())["manifest"]["files"]


# ---- damage, as a full disk, a partial copy or a storage fault leaves it -----------------------------------------
# Each returns the damaged file and what the refusal must say about it.

def truncate_expert(tag_dir: Path) -> tuple[Path, str]:
    f = tag_dir / "layer_1_expert_2_mp_rank_00_model_states.pt"
    size = f.stat().st_size
    with f.open("r+b") as h:
        h.truncate(size // 2)
    return f, f"{f}: {size // 2:,} bytes, the manifest says {size:,}"


def flip_optimizer_byte(tag_dir: Path) -> tuple[Path, str]:
    f = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    return f, (f"{f}: crc32 {zlib.crc32(data):08x}, the manifest says {manifest_files(tag_dir)[f.name]['crc32']} "
               "(same size: the content changed)")


def remove_expert(tag_dir: Path) -> tuple[Path, str]:
    f = tag_dir / "layer_0_expert_3_mp_rank_00_model_states.pt"
    f.unlink()
    return f, f"{f}: expert file missing (layer 0, expert 3); found 7 of 8 expert files in {tag_dir}"


def remove_rank_file(tag_dir: Path) -> tuple[Path, str]:
    f = tag_dir / "rank0_state.pt"
    size = f.stat().st_size
    f.unlink()
    return f, f"{f}: missing (the manifest lists {size:,} bytes written by rank 0)"


DAMAGE: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "truncated": truncate_expert, "flipped": flip_optimizer_byte, "no_expert": remove_expert,
    "no_rank_file": remove_rank_file}


# ---- the manifest ------------------------------------------------------------------------------------------

def test_every_save_lists_every_file_with_size_and_crc32(run):
    for tag in (OLDER, LATEST):
        tag_dir = run / "checkpoints" / tag
        state = json.loads((tag_dir / "train_state.json").read_text())
        assert state["manifest"]["algorithm"] == "crc32"
        files = state["manifest"]["files"]
        assert set(files) == {p.name for p in tag_dir.iterdir()} - {"train_state.json"}
        for name, entry in files.items():
            data = (tag_dir / name).read_bytes()
            assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}", "rank": 0}, name
        assert verify(tag_dir, full=True) is None


# ---- resume ------------------------------------------------------------------------------------------------

def resume_from_older_is_bit_for_bit(run: Path, damaged: Path, tiny_data: Path) -> None:
    """--resume_from the older tag (past the damaged `latest`) repeats steps 7-8 exactly and leaves two checkpoints
    that verify byte for byte: the damaged one was replaced, the one resumed from kept."""
    ok(launch(TRAIN, *train_flags(tiny_data, damaged, "--resume_from", OLDER)))
    full, resumed = read_metrics(run), read_metrics(damaged)
    assert sorted(resumed) == list(range(1, 9))
    for step in (7, 8):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert resumed[8]["val_loss"] == full[8]["val_loss"]
    ckpt = damaged / "checkpoints"
    assert (ckpt / "latest").read_text() == LATEST
    assert sorted(p.name for p in ckpt.glob("step*")) == [OLDER, LATEST]
    assert all(verify(ckpt / tag, full=True) is None for tag in (OLDER, LATEST))


def test_truncated_file_is_refused_by_the_cli_then_resume_from_continues(run, damaged, tiny_data):
    """The issue's run: one expert file of `latest` cut in half, then `train.py --resume`."""
    f, what = truncate_expert(damaged / "checkpoints" / LATEST)
    line = one_error_line(launch(TRAIN, *train_flags(tiny_data, damaged, "--resume")), "train.py")
    assert line == (f"train.py: error: --resume: checkpoint {LATEST} fails verification: {what}; the newest older "
                    f"checkpoint that verifies is {OLDER}: resume from it with --resume_from {OLDER}")
    assert (damaged / "checkpoints" / "latest").read_text() == LATEST  # nothing was picked for the user
    resume_from_older_is_bit_for_bit(run, damaged, tiny_data)


@pytest.mark.parametrize("fault", ["flipped", "no_expert", "no_rank_file"])
def test_damaged_latest_is_refused_then_resume_from_continues(capsys, monkeypatch, run, damaged, tiny_data, fault):
    tag_dir = damaged / "checkpoints" / LATEST
    f, what = DAMAGE[fault](tag_dir)
    if fault == "flipped":  # same size: only the checksums see it
        assert verify(tag_dir) is None and verify(tag_dir, full=True) is not None
    line = call_main(capsys, monkeypatch, tiny_data, damaged, resume=True, verify_checkpoint=fault == "flipped")
    assert f"--resume: checkpoint {LATEST} fails verification: {what}" in line, line
    assert line.endswith(f"; the newest older checkpoint that verifies is {OLDER}: resume from it with "
                         f"--resume_from {OLDER}"), line
    resume_from_older_is_bit_for_bit(run, damaged, tiny_data)


def test_resume_from_checks(capsys, monkeypatch, run, damaged, tiny_data):
    ckpt = damaged / "checkpoints"
    line = call_main(capsys, monkeypatch, tiny_data, damaged, resume_from="step00000007")
    assert line.endswith(f"--resume_from step00000007: no checkpoint tag {ckpt / 'step00000007'}; pass the name of "
                         f"a tag directory of {ckpt}, one of {OLDER}, {LATEST}"), line
    truncate_expert(ckpt / OLDER)  # the tag asked for is damaged too: nothing older verifies
    line = call_main(capsys, monkeypatch, tiny_data, damaged, resume_from=OLDER)
    assert f"--resume_from: checkpoint {OLDER} fails verification: " in line
    assert line.endswith("; no older checkpoint verifies (restore the files from a copy)"), line


# ---- export and the in-memory reader -----------------------------------------------------------------------

def export_refusal(what: str) -> str:
    return (f"checkpoint {LATEST} fails verification: {what}; the newest older checkpoint that verifies is "
            f"{OLDER}: export it with --tag {OLDER}")


def test_export_and_sampling_refuse_a_damaged_checkpoint(run, damaged, tmp_path):
    ckpt = damaged / "checkpoints"
    f, what = truncate_expert(ckpt / LATEST)
    with pytest.raises(CheckpointError) as e:
        export(damaged, tmp_path / "out", progress=False)
    assert str(e.value) == export_refusal(what)
    with pytest.raises(CheckpointError, match="fails verification"):
        load_state_dict(damaged)  # what launch/sample.py reads a run dir with
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)
    proc = launch(EXPORT, str(damaged), "--out", str(tmp_path / "cli"), "--quiet", timeout=300)
    assert one_error_line(proc, "export.py") == f"export.py: error: {export_refusal(what)}"
    assert (export(damaged, tmp_path / "older", tag=OLDER, progress=False) / "model.safetensors").is_file()

    shutil.copy2(run / "checkpoints" / LATEST / f.name, f)  # repaired; a flipped byte instead
    f, what = flip_optimizer_byte(ckpt / LATEST)
    export(damaged, tmp_path / "sizes_only", progress=False)  # the module weights are whole
    with pytest.raises(CheckpointError) as e:  # the fp32 master weights would be read from that very file
        export(damaged, tmp_path / "full", master_weights=True, progress=False, verify_checkpoint=True)
    assert str(e.value) == export_refusal(what)
    proc = launch(EXPORT, str(damaged), "--out", str(tmp_path / "cli2"), "--quiet", "--verify_checkpoint",
                  timeout=300)
    assert one_error_line(proc, "export.py") == f"export.py: error: {export_refusal(what)}"


# ---- one writer per run directory -------------------------------------------------------------------------

def test_second_run_on_the_same_out_is_refused_while_the_first_finishes(tiny_data, tmp_path):
    """A resubmitted job next to a running one: the second exits 2 at once naming the first's host and pid; the
    first trains on undisturbed; once it has ended, the lock is free again (the kernel drops it with the process)."""
    out, log, steps = tmp_path / "run", tmp_path / "first.log", 300
    flags = train_flags(tiny_data, out, "--eval_every", "0", "--save_every", "100", steps=steps)
    with log.open("w") as f:
        first = subprocess.Popen(rank_command(TRAIN, *flags), cwd=REPO, env=cpu_env(), stdout=f,
                                 stderr=subprocess.STDOUT)
        try:
            wait_for_metrics(out, first, 2)
            second = launch(TRAIN, *train_flags(tiny_data, out, "--resume", "--eval_every", "0", steps=steps))
            still_training = first.poll() is None
            first.wait(timeout=600)
        finally:
            first.kill()
    line = one_error_line(second, "train.py")
    assert still_training, "the first run ended before the second was refused: make it longer"
    assert line.startswith(f"train.py: error: {out} is being written by another training run "
                           f"(host {socket.gethostname()} pid {first.pid} since "), line
    assert line.endswith(f"; lock {out / 'train.lock'}): one run per --out; wait for it to end, stop it, or "
                         "choose another --out"), line
    assert first.returncode == 0, log.read_text()[-3000:]
    assert sorted(read_metrics(out)) == list(range(1, steps + 1))
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    lock = acquire_run_lock(out)
    assert lock is not None
    lock.close()


# ---- two ranks: each describes what it wrote -----------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_describe_their_own_files_and_a_missing_rank_file_is_refused(capsys, monkeypatch, tiny_data,
                                                                              tmp_path):
    """Expert parallelism 2: rank 1 writes its rank file, its optimizer partition and experts 2-3 of each layer,
    and hashes them itself (on a filesystem that is not shared rank 0 would not see them). Rank 1's file gone:
    refused, naming rank 1 and step 3; --resume_from step 3 on two ranks repeats steps 4-6 exactly."""
    flags = ("--ep_size", "2", "--keep_last", "0")
    out = tmp_path / "run"
    ok(launch(TRAIN, *train_flags(tiny_data, out, *flags, steps=6), nproc=2))
    tag_dir = out / "checkpoints" / "step00000006"
    files = manifest_files(tag_dir)
    assert set(files) == {p.name for p in tag_dir.iterdir()} - {"train_state.json"}
    assert {n for n, e in files.items() if e["rank"] == 1} == {
        "rank1_state.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        *(f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in (2, 3))}
    assert verify(tag_dir, full=True) is None

    damaged = Path(shutil.copytree(out, tmp_path / "damaged"))
    f = damaged / "checkpoints" / "step00000006" / "rank1_state.pt"
    f.unlink()
    line = call_main(capsys, monkeypatch, tiny_data, damaged, world=2, resume=True, ep_size=2)
    assert line.endswith(f"{f}: missing (the manifest lists {files['rank1_state.pt']['size']:,} bytes written by "
                         "rank 1); the newest older checkpoint that verifies is step00000003: resume from it with "
                         "--resume_from step00000003"), line
    ok(launch(TRAIN, *train_flags(tiny_data, damaged, *flags, "--resume_from", "step00000003", steps=6), nproc=2))
    full, resumed = read_metrics(out), read_metrics(damaged)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load", "val_loss"):
            assert resumed[step].get(key) == full[step].get(key), (step, key)
    assert verify(damaged / "checkpoints" / "step00000006", full=True) is None
