"""What a new user runs first, for real, on CPU:

    quickstart  the commands of `make quickstart` (read from the Makefile with `make -n`): generate synthetic
                stories, train the tiny preset (201k vocabulary), sample a story from the run dir;
                only the data and run dirs are moved into tmp_path, the step count is shortened, every step is
                logged and the sample's seed is fixed
    wandb       `--wandb` with WANDB_MODE=offline: the run finishes, the offline run files are written into the
                run dir, a resume continues the same W&B run, and nothing tries to reach the network
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TRAIN, cpu_env, launch, ok, read_metrics, train_flags

QUICKSTART_STEPS = 20  # the Makefile says 60; 20 already take the loss clearly down


def quickstart_commands(data: Path, run: Path) -> list[list[str]]:
    """The Python commands of `make quickstart`, as make would run them (`make -n` prints them and runs nothing,
    not even the setup script), with data/synthetic and runs/quickstart replaced by `data` and `run`."""
    printed = subprocess.run(["make", "-n", "--no-print-directory", "quickstart", f"PY={sys.executable}"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    moved = {"data/synthetic": str(data), "runs/quickstart": str(run)}
    commands = []
    for line in printed.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)
        if argv and argv[0] == sys.executable:
            commands.append([moved.get(a, a) for a in argv])
    used = {a for argv in commands for a in argv}
    assert set(moved.values()) <= used and not set(moved) & used, printed  # nothing lands in the repo's dirs
    return commands


def sample_default_prompt() -> str:
    spec = importlib.util.spec_from_file_location("sample_cli", REPO / "launch" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(["run"]).prompt


@pytest.mark.slow
def test_quickstart_trains_the_tiny_preset_and_samples_a_story(tmp_path):
    data, run = tmp_path / "sample", tmp_path / "quickstart"
    prepare, train, sample = quickstart_commands(data, run)
    assert [Path(c[1]).name for c in (prepare, train, sample)] == ["prepare_data.py", "train.py", "sample.py"]
    assert train[train.index("--model") + 1] == "tiny" and "--wandb" not in train
    train[train.index("--max_steps") + 1] = str(QUICKSTART_STEPS)
    train += ["--log_every", "1"]  # the Makefile logs every 10 steps; every step makes the trend measurable
    sample += ["--seed", "0"]  # the Makefile draws a fresh seed; a fixed one keeps the test reproducible
    # The Makefile's environment without a GPU (all cores: the 201k-vocabulary unembedding is one big matmul);
    # the datasets cache stays out of the home directory.
    env = cpu_env(TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf-cache"))
    env.pop("OMP_NUM_THREADS")

    def run_cmd(argv: list[str]) -> subprocess.CompletedProcess:
        return ok(subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600))

    run_cmd(prepare)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == "o200k_harmony" and meta["splits"]["train"]["tokens"] > 0

    run_cmd(train)
    m = read_metrics(run)
    assert sorted(m) == list(range(1, QUICKSTART_STEPS + 1))
    losses = [m[s]["loss"] for s in sorted(m)]
    assert not any(m[s]["skipped"] for s in m) and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(meta["vocab_size"]), abs=0.5)  # near uniform at init
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 2.0, losses  # clearly down, not noise
    vals = [m[s]["val_loss"] for s in sorted(m) if "val_loss" in m[s]]
    assert vals and vals[-1] < math.log(meta["vocab_size"]) - 1.0, vals
    assert (run / "checkpoints" / "latest").read_text() == f"step{QUICKSTART_STEPS:08d}"

    proc = run_cmd(sample)
    prompt = sample_default_prompt()
    assert proc.stdout.startswith(prompt) and len(proc.stdout.strip()) > len(prompt) + 10, proc.stdout[:500]


# ---- W&B -----------------------------------------------------------------------------------------------------

@pytest.fixture
def no_network():
    """A listening socket that every W&B address and proxy points at: a connection attempt shows up as a pending
    connection (nothing answers it), where a closed port would fail quietly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s, f"http://127.0.0.1:{s.getsockname()[1]}"


def wandb_env(tmp_path: Path, url: str) -> dict[str, str]:
    """Offline W&B with every directory it writes inside tmp_path, and no credentials or network."""
    dirs = {k: str(tmp_path / "wandb-home" / k.lower()) for k in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                                     "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")}
    env = cpu_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_BASE_URL=url, HTTP_PROXY=url, HTTPS_PROXY=url,
                  http_proxy=url, https_proxy=url, NO_PROXY="", no_proxy="", **dirs)
    env.pop("WANDB_API_KEY", None)
    return env


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def wandb_history(run_dir: Path) -> tuple[dict[int, dict], int | None]:
    """An offline run's logged history ({step: {key: value}}) and exit code, read back from its `run-<id>.wandb`
    file: W&B's LevelDB-style log (a 7-byte ":W&B" header, 32 KiB blocks of chunks with a 7-byte header: crc32c,
    length, type FULL/FIRST/MIDDLE/LAST) of wandb_internal_pb2.Record protobufs, which `wandb sync` uploads."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, history, exit_code = 32768, 7, b"", {}, None
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.HasField("history"):
                history[record.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                                    for item in record.history.item}
            elif record.HasField("exit"):
                exit_code = record.exit.exit_code
    return history, exit_code


def test_wandb_offline_needs_no_network(tiny_data, tmp_path, no_network):
    """--wandb with WANDB_MODE=offline and no network: exit 0, the offline run lands in the run dir and holds
    every metrics.jsonl record, and --resume continues the same W&B run id."""
    listener, url = no_network
    out = tmp_path / "run"
    env = wandb_env(tmp_path, url)
    wandb_flags = ("--wandb", "--wandb_project", "gptoss-test", "--save_every", "0")
    ok(launch(TRAIN, *train_flags(tiny_data, out, *wandb_flags, steps=3), env=env, timeout=300))
    run_id = (out / "wandb_id.txt").read_text()
    [first] = offline_runs(out)
    assert first.name.endswith(f"-{run_id}")
    history, exit_code = wandb_history(first)
    m = read_metrics(out)
    assert exit_code == 0 and sorted(history) == sorted(m) == [1, 2, 3]
    for step, record in m.items():
        logged = history[step]
        assert logged["_step"] == step
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens", "skipped_total"):
            assert logged[key] == pytest.approx(record[key]), key
        assert logged["expert_load_max/layer0"] == pytest.approx(max(record["expert_load"][0]) * 4)
    assert history[3]["val_loss"] == pytest.approx(m[3]["val_loss"])  # the last step evaluates

    # --resume continues the same W&B run (resume="allow" with the id kept in the run dir)
    ok(launch(TRAIN, *train_flags(tiny_data, out, *wandb_flags, "--resume", steps=5), env=env, timeout=300))
    assert (out / "wandb_id.txt").read_text() == run_id
    runs = offline_runs(out)
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    history, exit_code = wandb_history(runs[-1])
    assert exit_code == 0 and sorted(history) == [4, 5]

    assert not (REPO / "wandb").exists()
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # nobody tried to connect
        listener.accept()
