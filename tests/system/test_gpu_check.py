"""bench/gpu_check.py --dry_run: the one GPU check runs every stage on CPU at toy size, so the script that gets a
few minutes of a real GPU has been run end to end before, without `datasets` (the GPU machine lacks it) and, as
there, without TinyStories: on synthetic stories, through the `deepspeed` launcher with one CPU rank."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, cpu_env

ROWS = [  # (start of the check column, what its result must start with; None: any value)
    ("environment", None), ("DeepSpeed", None),
    ("attention parity, sliding W=16, bf16", "ok"), ("attention parity, full causal, bf16", "ok"),
    ("attention parity, stories, sliding W=16, bf16", "ok"), ("attention parity, stories, full causal, bf16", "ok"),
    ("head loss (chunked, fused) vs plain cross-entropy, bf16", "ok"),
    ("torch floor: fused head loss, bf16 forward + backward vs chunked", "ok: torch "),
    ("device choice: LOCAL_RANK=1, one GPU visible", "ok: init_distributed with LOCAL_RANK=1 on gloo"),
    ("expert kernel for nano, bf16", "loop; grouped: not chosen on CPU"),
    ("experts grouped vs loop, bf16, idle experts", "ok"), ("experts masked_dense vs loop, bf16, idle experts", "ok"),
    ("expert loop: host sync per layer", None), ("data", None),
    ("tiny, a40.json: time to first step", None), ("tiny, a40.json: tokens/s", None),
    ("tiny, a40.json: MFU", "n/a"), ("tiny, a40.json: peak memory", "n/a on CPU"),
    ("--resume from the halfway checkpoint", "ok: steps 3-4 again"),
    ("export + transformers greedy", "ok: 12/12 tokens equal"), ("sampled story", None),
    ("decode eager step vs transformers", None), ("decode compiled step vs transformers", None),
    ("transformers GptOssForCausalLM step, same model and batch", None),
    ("--compile: tokens/s", None), ("--activation_checkpointing: tokens/s, peak memory", None),
]


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): (cells[1].strip(), cells[2].strip()) for cells in rows[2:]}  # after the header


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_has_every_row(tmp_path):
    blocked = tmp_path / "blocked"  # the GPU machine has neither: an import of them fails the run
    for name in ("datasets", "pyarrow"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry_run", "--out", str(out),
                           "--data", str(tmp_path / "no-tinystories"), "--work", str(tmp_path / "work"),
                           # every stage must run here, on a busy 2-core machine: room beyond the GPU's 8 minutes
                           # (the budget logic is the harness's)
                           "--budget_s", "800"], cwd=REPO, capture_output=True, text=True, timeout=850,
                          env=cpu_env(PYTHONPATH=str(blocked), OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in proc.stdout  # printed and written: one table
    rows = table_rows(text)
    assert list(rows) == [name for name, _ in ROWS], list(rows)
    for name, expect in ROWS:
        result, _ = rows[name]
        assert not result.startswith(("FAIL", "skipped")), (name, rows[name])
        assert expect is None or result.startswith(expect), (name, rows[name])
    assert "60 + 20 stories, synthetic" in rows["data"][1]
    for kernel in ("grouped", "masked_dense"):
        assert "weight gradients exactly 0 in both: yes" in rows[f"experts {kernel} vs loop, bf16, idle experts"][1]
    assert "--vocab data:" in rows["tiny, a40.json: tokens/s"][1]
    assert "story masks" in rows["attention parity, stories, full causal, bf16"][1]
    assert "x eager" in rows["--compile: tokens/s"][0], rows["--compile: tokens/s"]
    assert rows["sampled story"][1].split(": ", 1)[1].startswith("Once upon a time")
