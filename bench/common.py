"""Shared helpers of the bench scripts: machine description, quiet-machine wait, timing, peak memory,
fresh-process workers, greedy decoding in transformers and markdown tables.

Why these choices:
- Peak memory of a CPU run is the process's peak resident set (VmHWM). torch's allocator has no CPU
  statistics and tracemalloc does not see its buffers. `reset_peak_rss` writes 5 to /proc/self/clear_refs
  (Linux >= 4.0), so a worker can build its model first and measure only the phase that matters.
- Each measured side runs in a fresh subprocess (`run_worker`), so the peaks and the allocator's caches
  of one side never leak into the other's numbers.
- The machine may be shared: `wait_until_quiet` waits for the load average to drop before a
  measurement, timings report the minimum (the least disturbed run) next to the median, and every
  table prints the load seen when it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKER_TAG = "BENCH_RESULT "  # the line a worker prints its JSON result on


# ---- machine ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The `lscpu` model name (what BENCHMARKS.md labels a machine with)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    """1-minute load average (number of runnable processes), 0.0 where unavailable."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_info() -> dict[str, Any]:
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load": load_average()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One markdown line naming the machine and library versions."""
    tf = f", transformers {info['transformers']}" if info.get("transformers") else ""
    return (f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
            f"torch {info['torch']}{tf}; 1-min load average at start {info['load']:.2f}.")


def add_quiet_machine_args(parser: argparse.ArgumentParser, max_load: float = 2.5) -> None:
    """--max_load / --wait_s: every benchmark waits for other jobs to finish before it times anything."""
    parser.add_argument("--max_load", type=float, default=max_load,
                        help="before each measurement wait (up to --wait_s) for the 1-min load average to fall "
                        "to this (a previous worker process of ours leaves ~2 on 2 cores; more means other "
                        "jobs); negative: do not wait (default: %(default)s)")
    parser.add_argument("--wait_s", type=float, default=120.0, help="longest wait for a quiet machine, s")


def wait_until_quiet(max_load: float, timeout_s: float, poll_s: float = 5.0) -> float:
    """Wait until the 1-min load average is <= max_load (other jobs finished) or timeout_s passed.

    Returns the load seen last; a negative max_load disables the wait.
    """
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while max_load >= 0 and load > max_load and time.monotonic() < deadline:
        time.sleep(poll_s)
        load = load_average()
    return load


# ---- memory ----------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or the last `reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (peak is then lifetime)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# ---- timing ----------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds of each timed repetition (warm-up excluded)."""

    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Call fn warmup + repeats times; keep the timings of the last `repeats` calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return Timing(seconds)


def interleaved_best(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin (one call each per round), so that a burst of load from other
    processes hits all of them alike instead of one; each gets its own Timing."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: Timing(s) for name, s in seconds.items()}


# ---- decoding ------------------------------------------------------------------------------------

def hf_causal_lm(path: str | Path, device: Any) -> Any:
    """An export dir loaded as transformers' GptOssForCausalLM in fp32, eager attention (its sdpa path has
    no attention sinks), eval mode, with no eos ids: the export's generation_config stops at <|endoftext|>,
    and `min_new_tokens` would instead suppress it, unlike our sampler without stop ids (see `hf_greedy`)."""
    import torch
    import transformers

    model = transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


def hf_greedy(hf: Any, prompts: Any, new_tokens: int) -> list[list[int]]:
    """transformers `generate`, greedy, exactly `new_tokens` new ids per row (a model from `hf_causal_lm`
    has no eos id to stop at)."""
    import torch

    with torch.no_grad():
        out = hf.generate(prompts.to(hf.device), attention_mask=torch.ones_like(prompts).to(hf.device),
                          max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def time_decoders(runs: dict[str, Callable[[], list[list[int]]]], repeats: int, max_load: float,
                  wait_s: float) -> dict[str, tuple[Timing, list[list[int]]]]:
    """Time each decoder after a wait for a quiet machine: one warm-up call, whose ids are returned (greedy
    decoding gives the same ids every call) for the caller to compare, then `repeats` timed calls."""
    results = {}
    for label, fn in runs.items():
        wait_until_quiet(max_load, wait_s)
        ids = fn()
        results[label] = (time_fn(fn, repeats, warmup=0), ids)
    return results


# ---- workers ---------------------------------------------------------------------------------------

def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result where `run_worker` finds it."""
    print(WORKER_TAG + json.dumps(result), flush=True)


def run_worker(script: str | Path, args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run `python script args...` in a fresh process and return the JSON it emitted.

    A worker that fails, times out or is killed for memory returns {"error": "..."} instead.
    """
    cmd = [sys.executable, str(script), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode < 0:
        tail = f"killed by signal {-proc.returncode} (out of memory?)"
    return {"error": f"exit {proc.returncode}: {tail[:200]}", "cmd": shlex.join(cmd)}


# ---- markdown --------------------------------------------------------------------------------------

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one character per column, 'l' or 'r' (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that produced a table, relative to the repo root, for copy-paste."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])
