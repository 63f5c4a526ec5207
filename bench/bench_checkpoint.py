"""What a checkpoint manifest costs: candidate checksums over real torch.save output, against the save itself.

    python bench/bench_checkpoint.py --mb 400                          # checksum throughput, 400 MB file
    python bench/bench_checkpoint.py --mb 400 --real_save --layers 1   # and a real save of nano cut to 1 layer
    python bench/bench_checkpoint.py --mb 0 --reshard --layers 1       # save on 2 ranks, resume on 2 and on 1

Part 1 writes a state dict of fp32 tensors (random values, like Adam moments: they do not compress) with
torch.save, fsync included, then times each checksum over the file read back from the page cache, as
`gptoss.checkpoint.save` does right after writing (best of 3). Part 2 trains the nano preset with --layers
layers (full 201k vocabulary, so the embeddings dominate as in nano) for one step on CPU (fp32, ZeRO-2)
through launch/train.py and reports the save's own log line: files, bytes, seconds, crc32 seconds. With
--reshard, the same model saved by 2 CPU ranks (ZeRO-2, ep 2) is resumed for one more step twice: on 2 ranks at
ep 2 (DeepSpeed's own load) and on 1 rank (gptoss.train.reshard); each side's time is its own log line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO, machine_info, machine_line

from gptoss.config import get_config

CHUNK = 16 << 20
NANO_BYTES = 311.5e6 * 16  # bf16 weights + fp32 master + 2 fp32 Adam moments ~ 16 bytes per parameter


def stream(path: Path, update) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            update(view[:n])


def zlib_sum(name: str):
    fn = getattr(zlib, name)

    def run(path: Path) -> None:
        state = [fn(b"")]

        def update(b) -> None:
            state[0] = fn(b, state[0])

        stream(path, update)
    return run


def hashlib_sum(name: str):
    def run(path: Path) -> None:
        h = hashlib.new(name)
        stream(path, h.update)
    return run


CHECKSUMS = {"crc32 (zlib)": zlib_sum("crc32"), "adler32 (zlib)": zlib_sum("adler32"),
             "sha256 (hashlib)": hashlib_sum("sha256"), "blake2b (hashlib)": hashlib_sum("blake2b"),
             "md5 (hashlib)": hashlib_sum("md5")}


def checksum_table(mb: float, workdir: Path) -> None:
    n = max(1, int(mb * 1e6 / 4 / (1 << 22)))
    state = {f"exp_avg.{i}": torch.randn(1 << 22) for i in range(n)}  # 16 MiB fp32 tensors
    path = workdir / "states.pt"
    t0 = time.perf_counter()
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    save_s = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"\nfile: {size / 1e6:.1f} MB of torch.save output; torch.save + fsync {save_s:.2f}s "
          f"({size / 1e6 / save_s:.0f} MB/s)\n")
    print("| checksum | MB/s (best of 3) | s per 5 GB (nano, 1 rank) | vs torch.save of the same bytes |")
    print("|---|---:|---:|---:|")
    for name, run in CHECKSUMS.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            run(path)
            best = min(best, time.perf_counter() - t0)
        print(f"| {name} | {size / 1e6 / best:,.0f} | {NANO_BYTES / (size / best):.1f} | "
              f"{100 * best / save_s:.0f}% |")


def synthetic_data(out: Path, vocab: int, tokens: int = 1 << 16) -> None:
    """Random ids over the full vocabulary: the save does not care what was learnt."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "val"):
        ids = np.random.default_rng(0).integers(1, vocab, tokens, dtype="<u4")
        ids.tofile(out / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": tokens, "documents": 1, "max_token_id": int(ids.max()),
                         "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
    (out / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "synthetic", "vocab_size": vocab,
                                               "eot_id": 0, "dtype": "uint32", "splits": splits}))


SAVED = re.compile(r"saved checkpoint \S+ \(final; (\d+) files, ([\d.]+) GB in ([\d.]+)s, of which ([\d.]+)s for "
                   r"rank 0's crc32 of ([\d.]+) GB\)")


RESUMED = re.compile(r"resumed from \S+ at step \d+ \((loaded|resharded) in ([\d.]+)s\)")


def train(workdir: Path, out: str, steps: int, nproc: int = 1, *extra: str) -> str:
    """launch/train.py (nano as saved in workdir, fp32 ZeRO-2) on `nproc` CPU ranks; its log."""
    ranks = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *ranks, str(REPO / "launch" / "train.py"),
           "--ds_config", str(REPO / "ds_configs" / "cpu.json"), "--model", str(workdir / "model.json"),
           "--data", str(workdir / "data"), "--out", str(workdir / out), "--max_steps", str(steps),
           "--seq_len", "32", "--eval_every", "0", "--save_every", "0", "--log_every", "1", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stderr + proc.stdout


def nano_workdir(layers: int, workdir: Path) -> Any:
    cfg = get_config("nano", num_hidden_layers=layers)
    cfg.save(workdir / "model.json")
    synthetic_data(workdir / "data", cfg.vocab_size)
    return cfg


def real_save(layers: int, workdir: Path) -> None:
    cfg = nano_workdir(layers, workdir)
    m = SAVED.search(train(workdir, "run", 1))
    files, gb, total_s, crc_s, crc_gb = int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5])
    print(f"\nreal save, nano with {layers} layer(s) ({sum(p.numel() for p in _params(cfg)) / 1e6:.1f}M parameters, "
          f"fp32 ZeRO-2, 1 rank): {files} files, {gb:.2f} GB in {total_s:.2f}s; crc32 of {crc_gb:.2f} GB took "
          f"{crc_s:.2f}s = {100 * crc_s / total_s:.1f}% of the save ({crc_gb / crc_s:.2f} GB/s)")


def reshard(layers: int, workdir: Path) -> None:
    cfg = nano_workdir(layers, workdir)
    saved = SAVED.search(train(workdir, "w2", 1, 2, "--ep_size", "2"))
    rows = []
    for name, nproc, ep in (("same layout: 2 ranks, ep 2 (DeepSpeed's load)", 2, 2),
                            ("resharded: 1 rank, ep 1 (gptoss.train.reshard)", 1, 1)):
        shutil.rmtree(workdir / "resumed", ignore_errors=True)
        shutil.copytree(workdir / "w2", workdir / "resumed")
        m = RESUMED.search(train(workdir, "resumed", 2, nproc, "--ep_size", str(ep), "--resume"))
        rows.append((name, float(m[2])))
    n = sum(p.numel() for p in _params(cfg)) / 1e6
    print(f"\nnano with {layers} layer(s) ({n:.1f}M parameters, fp32 ZeRO-2), saved by 2 ranks at ep 2: "
          f"{saved[2]} GB in {saved[3]}s\n\n| resume | seconds | / save |\n| --- | ---: | ---: |")
    print(f"| save (2 ranks, ep 2) | {float(saved[3]):.2f} | 1.00 |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / float(saved[3]):.2f} |")


def _params(cfg):
    from gptoss.model import build_model

    return build_model(cfg, device="meta").parameters()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=400, help="size of the torch.save file to hash (default: %(default)s)")
    p.add_argument("--real_save", action="store_true", help="also time a real save through launch/train.py")
    p.add_argument("--reshard", action="store_true", help="also time a resume at another world size and ep size")
    p.add_argument("--layers", type=int, default=1, help="nano layers (default: %(default)s)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir, removed after)")
    args = p.parse_args()
    print(machine_line(machine_info()))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.mb > 0:
            checksum_table(args.mb, Path(tmp))
        if args.real_save:
            real_save(args.layers, Path(tmp))
        if args.reshard:
            reshard(args.layers, Path(tmp))


if __name__ == "__main__":
    main()
