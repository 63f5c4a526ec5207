"""bench/bench_data_vocab.py's own arithmetic: the throughput it reports leaves the warm-up window out, the loss
summary reads the right records, and bad flags are refused naming the flag (the benchmark itself is run by hand)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_data_vocab.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_data_vocab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records() -> list[dict]:
    """Logged every 5 steps of 100 tokens; the first window (warm-up) took 10 s, later ones 1 s; evals at 10, 20."""
    out, elapsed = [], 0.0
    for step in range(5, 21, 5):
        window = 10.0 if step == 5 else 1.0
        elapsed += window
        out.append({"step": step, "tokens": 100 * step, "elapsed_s": elapsed, "loss": 10.0 - step / 10,
                    "tokens_per_s": 500 / window, "mem_rss_gib": 0.5 + step / 100})
        if step % 10 == 0:
            out[-1].update(val_loss=9.0 - step / 10, val_bpb=3.0 - step / 100)
    return out


def test_throughput_leaves_the_warm_up_window_out(bench):
    assert bench.steady_tokens_per_s(records()) == pytest.approx(1500 / 3.0)  # steps 5 -> 20: 1500 tokens in 3 s
    one = records()[:1]
    assert bench.steady_tokens_per_s(one) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        bench.steady_tokens_per_s([{"step": 1, "val_loss": 1.0}])


def test_summary_takes_the_last_quarter_the_last_eval_and_the_peak_memory(bench):
    s = bench.summarize(records())
    assert s["steps"] == 20 and s["mem_rss_gib"] == pytest.approx(0.7)
    assert s["train_loss_tail"] == pytest.approx(8.0)  # only step 20 lies past 0.75 * 20
    assert s["val"] == [(10, 8.0, 2.9), (20, 7.0, 2.8)]
    assert (s["val_loss"], s["val_bpb"]) == (7.0, 2.8)
    no_eval = bench.summarize([{k: v for k, v in r.items() if not k.startswith("val")} for r in records()])
    assert math.isnan(no_eval["val_loss"]) and math.isnan(no_eval["val_bpb"]) and no_eval["val"] == []


@pytest.mark.parametrize("argv, message", [
    (["--nano_steps", "1"], "--nano_steps 1: expected 0 (skip) or >= 2"),
    (["--steps", "1"], "--steps 1: expected an integer >= 2"),
    (["--data", "/nonexistent"], "--data /nonexistent: no meta.json"),
])
def test_bad_flags_are_refused_naming_the_flag(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
