"""Sampling, export and analysis need no DeepSpeed: in processes where `import deepspeed` fails, a checkpointed
run samples, exports and is analysed, its export samples the same story, and stdout holds only the story."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TRAIN, cpu_env, ok, train_flags

from gptoss.config import get_config
from gptoss.data import write_prepared
from gptoss.generate import sample_text
from gptoss.tokenizer import EOT_ID, VOCAB_SIZE, encode

STORIES = ["Once upon a time there was a little cat. The cat liked to play in the sun.",
           "Tom had a red ball. He threw it to his dog, and the dog ran after it.",
           "A little girl went to the woods. She saw a bird and sang a happy song."]
PROMPT = "A little girl went to the woods"
BLOCK_DEEPSPEED = 'import sys\nsys.modules["deepspeed"] = None  # `import deepspeed` raises ModuleNotFoundError\n'


@pytest.fixture(scope="module")
def story_run(tmp_path_factory) -> Path:
    """The tiny shape trained 3 steps on o200k_harmony stories (data vocabulary: fast), checkpointed."""
    tmp = tmp_path_factory.mktemp("no_ds")
    stream = np.array([t for s in STORIES for t in [*encode(s), EOT_ID]] * 40, dtype="<u4")
    write_prepared(tmp / "data", {"train": stream, "val": stream[:400]}, tokenizer="o200k_harmony",
                   vocab_size=VOCAB_SIZE, eot_id=EOT_ID, source="test_no_deepspeed")
    get_config("tiny").save(tmp / "data" / "model.json")
    ok(subprocess.run([sys.executable, str(TRAIN), *train_flags(tmp / "data", tmp / "run", "--vocab", "data",
                                                                steps=3)],
                      cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600))
    return tmp / "run"


def without_deepspeed(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python launch/<script> args` with a sitecustomize that blocks the deepspeed import."""
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_DEEPSPEED)
    env = cpu_env(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    return subprocess.run([sys.executable, *([str(REPO / "launch" / script)] if script else []), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_sample_export_and_analyse_without_deepspeed(story_run, tmp_path):
    blocked = without_deepspeed(tmp_path, "", "-c", "import deepspeed")
    assert blocked.returncode != 0 and "import of deepspeed halted" in blocked.stderr  # the block is in force

    flags = ["--prompt", PROMPT, "--max_new_tokens", "16", "--seed", "3", "--num_samples", "2", "--device", "cpu"]
    from_run = ok(without_deepspeed(tmp_path, "sample.py", str(story_run), *flags))
    texts = sample_text(story_run, PROMPT, max_new_tokens=16, seed=3, num_samples=2, device="cpu",
                        write=lambda s: None)
    assert from_run.stdout == "\n\n---\n\n".join(texts) + "\n"  # the stories and nothing else
    assert all(t.startswith(PROMPT) and len(t) > len(PROMPT) for t in texts)

    export_dir = tmp_path / "export"
    exported = ok(without_deepspeed(tmp_path, "export.py", str(story_run), "--out", str(export_dir), "--quiet"))
    assert exported.stdout == f"exported -> {export_dir}\n"
    from_export = ok(without_deepspeed(tmp_path, "sample.py", str(export_dir), *flags))
    assert from_export.stdout == from_run.stdout

    ok(without_deepspeed(tmp_path, "analyze.py", "expert-usage", "--model", str(story_run), "--max_batches", "1",
                         "--out", str(tmp_path / "experts")))
    for proc in (from_run, exported, from_export):
        assert "deepspeed" not in (proc.stdout + proc.stderr).lower()
