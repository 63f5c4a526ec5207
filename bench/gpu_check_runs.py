"""gpu_check's training stages, the main command's workload: a TinyStories-like corpus tokenized without
`datasets`, then nano with --vocab data and story-aware attention through the `deepspeed` launcher and
ds_configs/a40.json (with and without --compile and --activation_checkpointing), a save and a --resume; and
transformers' training step on the same batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from gpu_check_harness import REPO, Check, free_memory, need, sync

# ---- data --------------------------------------------------------------------------------------------------

def _stories(ck: Check) -> tuple[dict[str, list[str]], str]:
    """Train and val stories: the first ones of --data's train.txt / valid.txt (TinyStories .txt), else synthetic
    stories (gptoss.data.synthetic: real TinyStories is not on the GPU machine)."""
    from gptoss.data.sources import read_txt_stories
    from gptoss.data.synthetic import generate_corpus

    n, src = ck.sizes.stories, Path(ck.args.data)
    n_val = max(20, n // 10)
    if (src / "train.txt").is_file() and (src / "valid.txt").is_file():
        splits = {}
        for split, name, count in (("train", "train.txt", n), ("val", "valid.txt", n_val)):
            it = read_txt_stories(src / name)
            splits[split] = [story for _, story in zip(range(count), it)]
        return splits, f"the first stories of {src}"
    stories = [s.text for s in generate_corpus(n + n_val, seed=0)]
    return {"train": stories[:n], "val": stories[n:]}, f"synthetic (gptoss.data.synthetic, seed 0; no {src}/train.txt)"


def prepare_data(ck: Check) -> None:
    """train.bin, val.bin, meta.json and token_counts.npz (what --vocab data reads) by gptoss.data's own
    writer, tokenized with tiktoken only."""
    import numpy as np

    from gptoss.data import DTYPE, write_prepared
    from gptoss.tokenizer import ENCODING_NAME, EOT_ID, VOCAB_SIZE, encode_documents

    t0, out = time.perf_counter(), ck.work / "data"
    stories, source = _stories(ck)
    arrays = {split: np.asarray(encode_documents(texts), dtype=DTYPE) for split, texts in stories.items()}
    utf8 = {split: sum(len(t.encode()) for t in texts) for split, texts in stories.items()}
    splits = write_prepared(out, arrays, tokenizer=ENCODING_NAME, vocab_size=VOCAB_SIZE, eot_id=EOT_ID,
                            source=source, utf8_bytes=utf8)["splits"]
    ck.found["data"] = out
    tr, va = splits["train"], splits["val"]
    ck.add("data", f"{tr['tokens']:,} train / {va['tokens']:,} val tokens",
           f"{tr['documents']:,} + {va['documents']:,} stories, {source}, tokenized by gptoss.tokenizer "
           f"(tiktoken, no `datasets`) in {time.perf_counter() - t0:.1f} s")


# ---- the trainer -------------------------------------------------------------------------------------------

def ds_config(ck: Check) -> Path:
    """ds_configs/a40.json with a warmup that fits the check's few steps (its 200 would keep the LR near 0 and
    the loss where it started), and in a dry run a toy batch; everything else as shipped."""
    cfg = json.loads((REPO / "ds_configs" / "a40.json").read_text())
    cfg["scheduler"]["params"]["warmup_num_steps"] = warmup_steps(ck)
    if ck.sizes.batch is not None:
        cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = ck.sizes.batch
    path = ck.work / "a40-check.json"
    if not path.is_file():  # written once: runs that start together read it
        path.write_text(json.dumps(cfg, indent=2))
    return path


def warmup_steps(ck: Check) -> int:
    return max(1, ck.sizes.steps // 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_command(ck: Check, out: Path, *flags: str, launcher: bool = True) -> list[str]:
    """The README's training command at the check's size: the `deepspeed` launcher (as python -m, so a DeepSpeed
    installed into a --target folder works too) with one rank, a40.json, --vocab data, story-aware attention
    (the default), a checkpoint halfway and at the end. Without `launcher`: train.py alone, one process, saved
    at the end only."""
    s = ck.sizes
    start = ["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(_free_port())] if launcher \
        else []
    save_every = s.steps // 2 if launcher else 0
    return [sys.executable, *start, str(REPO / "launch" / "train.py"), "--ds_config", str(ds_config(ck)),
            "--model", s.model, "--vocab", "data", "--data", str(need(ck, "data", "data")), "--out", str(out),
            "--max_steps", str(s.steps), "--seq_len", str(s.seq_len), "--log_every", "1", "--eval_every",
            str(s.steps), "--eval_batches", "4", "--save_every", str(save_every), *flags]


def _records(out: Path, complete: bool = True) -> list[dict[str, Any]]:
    """metrics.jsonl's records; `complete=False` while the run may be writing its last line (dropped)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not complete and lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [json.loads(line) for line in lines]


def train(ck: Check, name: str, *flags: str, out: Path | None = None, launcher: bool = True) -> dict[str, Any]:
    """The main command in a subprocess; time to its first new metrics record, then the records' numbers."""
    out = out or ck.work / f"run-{name}"
    cmd = main_command(ck, out, *flags, launcher=launcher)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    log = ck.work / f"train-{name}.log"
    limit = max(30.0, ck.left() - 30)
    before = _records(out)  # a resumed run drops those past its checkpoint, then logs its steps anew
    t0, first = time.monotonic(), None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        while proc.poll() is None:
            if first is None and any(r not in before for r in _records(out, complete=False)):
                first = time.monotonic() - t0
            if time.monotonic() - t0 > limit:
                os.killpg(proc.pid, 9)  # the launcher and its rank
                proc.wait()
                raise TimeoutError(f"train.py {' '.join(flags)} still running after {limit:.0f} s (log: {log})")
            time.sleep(0.2)
    if proc.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()] or ["no output"]
        print("\n".join(lines[-40:]), file=sys.stderr)  # the work dir may not outlive the check
        raise RuntimeError(f"train.py {' '.join(flags)} exited {proc.returncode}: {lines[-1][:250]}")
    records = _records(out)
    warm = min(2, len(records) - 1)  # step 1 compiles; the median skips the first steps
    steady = [r for r in records if r["step"] > warm]
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mems = [r["mem_gpu_gib"] for r in records if r.get("mem_gpu_gib") is not None]
    return {"out": out, "first_s": first if first is not None else time.monotonic() - t0, "records": records,
            "step1_s": records[0]["elapsed_s"], "tps": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(mfus) if mfus else None, "mem": max(mems) if mems else None,
            "rss": max(r["mem_rss_gib"] for r in records), "loss": (records[0]["loss"], records[-1]["loss"]),
            "val": records[-1].get("val_loss"), "warm": warm, "steps": len(records)}


def _mem(r: dict[str, Any]) -> str:
    return f"{r['mem']:.1f} GiB" if r["mem"] is not None else f"n/a on CPU (host RSS {r['rss']:.2f} GiB)"


def _data_rows(out: Path) -> str:
    kept = json.loads((out / "model_config.json").read_text()).get("kept_ids")
    return f"--vocab data: {len(kept):,} kept ids + 1 tail row" if kept else "--vocab data: every id kept"


def train_default(ck: Check) -> None:
    from gptoss.train.metrics import peak_flops

    if ck.sizes.concurrent_variants:
        ck.found["variants"] = start_variants(ck, len(VARIANTS))
    r = train(ck, "default")
    ck.found["run"], ck.found["tps"], ck.found["mem"] = r["out"], r["tps"], r["mem"]
    ck.found["records"] = r["records"]
    what = f"{ck.sizes.model}, a40.json"
    peak = peak_flops()
    ck.add(f"{what}: time to first step", f"{r['first_s']:.1f} s",
           f"`deepspeed` launcher to the first metrics record: imports, DeepSpeed init, model, step 1 "
           f"({r['step1_s']:.1f} s of it, compilation included)")
    ck.add(f"{what}: tokens/s", f"{r['tps']:,.0f}",
           f"median of steps {r['warm'] + 1}-{r['steps']}, seq {ck.sizes.seq_len}, {_data_rows(r['out'])}, "
           f"story-aware attention; loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}, val {r['val']:.3f} (a40.json, "
           f"warmup_num_steps {warmup_steps(ck)} instead of 200)")
    ck.add(f"{what}: MFU", f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
           f"dense bf16 peak {peak / 1e12:.1f} TFLOP/s (gptoss.train.metrics.PEAK_FLOPS)" if peak else
           "no peak known for this device (exact names in gptoss.train.metrics.PEAK_FLOPS)")
    ck.add(f"{what}: peak memory", _mem(r), "torch.cuda.max_memory_allocated over the run's records")


def resume(ck: Check) -> None:
    """The run as if it died after its halfway checkpoint: `latest` names that one, the last is gone; --resume
    must replay the second half to the losses the uninterrupted run logged."""
    out, before = need(ck, "run", "train"), need(ck, "records", "train")
    ckpts = out / "checkpoints"
    tags = sorted(p.name for p in ckpts.glob("step*") if p.is_dir())
    if len(tags) < 2:
        raise RuntimeError(f"expected a halfway and a final checkpoint in {ckpts}, found {tags}")
    mid, last = tags[-2], tags[-1]
    shutil.rmtree(ckpts / last)
    (ckpts / "latest").write_text(mid)
    r = train(ck, "resume", "--resume", out=out)
    start = int(mid.removeprefix("step"))
    old = {x["step"]: x for x in before}
    new = {x["step"]: x for x in r["records"] if x["step"] > start}
    steps = sorted(new)
    delta = max(abs(new[s]["loss"] - old[s]["loss"]) / abs(old[s]["loss"]) for s in steps)
    val = (new[steps[-1]].get("val_loss"), old[steps[-1]].get("val_loss"))
    ok = steps == [s for s in sorted(old) if s > start] and delta <= 0.02
    ck.add("--resume from the halfway checkpoint", f"{'ok' if ok else 'FAIL'}: steps {steps[0]}-{steps[-1]} again, "
           f"loss max |Δ| {delta:.1e} relative",
           f"{last} deleted, `latest` -> {mid}, the same command with --resume: loss at step {steps[0]} "
           f"{new[steps[0]]['loss']:.4f} (uninterrupted {old[steps[0]]['loss']:.4f}), at step {steps[-1]} "
           f"{new[steps[-1]]['loss']:.4f} ({old[steps[-1]]['loss']:.4f}); val {val[0]:.4f} ({val[1]:.4f}); "
           f"resumed in {r['first_s']:.1f} s to its first record; pass: the same steps, each loss within 2%")


VARIANTS = {"compile": "--compile", "ckpt": "--activation_checkpointing"}


def start_variants(ck: Check, workers: int) -> dict[str, Any]:
    """The variant runs (train.py alone: the launcher's seconds buy nothing there), as futures."""
    from concurrent.futures import ThreadPoolExecutor

    ds_config(ck)  # written before the runs read it
    pool = ThreadPoolExecutor(workers)
    runs = {k: pool.submit(train, ck, k, flag, launcher=False) for k, flag in VARIANTS.items()}
    pool.shutdown(wait=False)
    return runs


def train_variants(ck: Check) -> None:
    """--compile and --activation_checkpointing, each against the run without; one after the other, but in a dry
    run all at once from the start of the train stage (their tokens/s mean nothing on a CPU)."""
    runs = ck.found.pop("variants", None) or start_variants(ck, 1)
    r = runs["compile"].result()
    ck.add("--compile: tokens/s", f"{r['tps']:,.0f} ({r['tps'] / need(ck, 'tps', 'train'):.2f}x eager)",
           f"time to first step {r['first_s']:.1f} s; peak memory {_mem(r)}; loss {r['loss'][0]:.3f} -> "
           f"{r['loss'][1]:.3f}")
    r = runs["ckpt"].result()
    mem = f" ({r['mem'] / ck.found['mem']:.2f}x)" if r["mem"] and ck.found.get("mem") else ""
    ck.add("--activation_checkpointing: tokens/s, peak memory",
           f"{r['tps']:,.0f} ({r['tps'] / need(ck, 'tps', 'train'):.2f}x without); {_mem(r)}{mem}",
           f"same run otherwise; loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}")


# ---- transformers' training step ---------------------------------------------------------------------------

def _peer_timing(ck: Check, cfg: Any, attn: str, batches: list[Any]) -> tuple[common.Timing, float | None]:
    """transformers' model with our seed-0 weights in bf16, torch AdamW: step timings and peak GiB (GPU)."""
    import torch
    from bench_train_step import build_side

    model = build_side("hf", cfg, attn).to(ck.device, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    cuda = ck.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        for x in batches:
            model(x, labels=x).loss.backward()  # cross-entropy + router aux loss (output_router_logits)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(ck)

    timing = common.time_fn(step, ck.sizes.peer[2], warmup=1)
    return timing, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def peer_step(ck: Check) -> None:
    import numpy as np
    import torch

    from gptoss.config import get_config
    from gptoss.data import TokenDataset, data_kept_ids

    micro, accum, timed = ck.sizes.peer
    data = TokenDataset(need(ck, "data", "data"), "train", seq_len=ck.sizes.seq_len)
    kept = torch.tensor(data_kept_ids(data) or range(data.vocab_size))
    cfg = get_config(ck.sizes.model, vocab_size=len(kept) + 1)  # ours under --vocab data: kept ids + the tail row
    starts = np.random.default_rng(0).integers(0, len(data), (accum, micro))
    batches = [torch.searchsorted(kept, data.batch(s)[0]).to(ck.device) for s in starts]
    errors = []
    for attn in ("flex_attention", "eager") if ck.device.type == "cuda" else ("eager",):
        try:
            timing, mem = _peer_timing(ck, cfg, attn, batches)
            break
        except Exception as e:  # flex_attention may not compile here: eager next
            errors.append(f"{attn}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        finally:
            free_memory(ck)
    else:
        raise RuntimeError("; ".join(errors))
    tps = micro * accum * ck.sizes.seq_len / timing.median
    ours = ck.found.get("tps")
    mem_note = f"; peak {mem:.1f} GiB (ours {ck.found['mem']:.1f})" if mem is not None and ck.found.get("mem") else ""
    ck.add("transformers GptOssForCausalLM step, same model and batch",
           f"{tps:,.0f} tokens/s" + (f"; ours {ours / tps:.2f}x" if ours else ""),
           f"attn_implementation={attn}, bf16 weights + torch AdamW (no fp32 master copy, no DeepSpeed, no story "
           f"masks: cheaper than ours), {cfg.vocab_size:,} vocabulary rows (ours under --vocab data), {accum} x "
           f"{micro} x {ck.sizes.seq_len} tokens per step, median of {timed}{mem_note}"
           + (f"; failed first: {errors[0]}" if errors else ""))
