"""One GPU check in one call, at most ~8 minutes on one GPU: is the first A40 run ready to start, fast and right?

    python3 bench/gpu_check.py --out gpu_check.md      # on the GPU machine, with gpu_kit/ carried along
    python bench/gpu_check.py --dry_run --out c.md     # every stage on CPU at toy size (tests/system/test_gpu_check.py)

Prints one markdown table (and writes it to --out), one or more rows per stage:
  environment  GPU, torch, CUDA; DeepSpeed installed from gpu_kit/wheels (`pip install --no-index
               --find-links`) where it is missing
  parity       FlexAttention with sinks vs eager attention, bf16, sliding and full, without and with story
               (document) masks, forward and backward (each against fp32 eager, next to bf16 eager's own error);
               the head loss: chunked and fused vs plain cross-entropy, then their time and peak memory at nano's
               vocabulary (bench/bench_loss.py); torch against gptoss.TORCH_FLOOR: the fused loss in bf16 forward
               + backward (torch.addmm with out_dtype on CUDA) vs chunked
  platform     the GPU a rank takes with LOCAL_RANK=1 and one GPU visible (srun --gpus-per-task=1), and the NCCL
               error handling it starts with, from init_distributed in a subprocess; the expert kernel chosen for
               nano in bf16 (grouped only on sm_9x), then grouped GEMM and masked dense vs the loop, bf16 forward
               + backward with idle experts: errors, idle gradients exactly 0, times; the loop's host sync per
               layer (counts on the device vs on the host)
  data         a TinyStories-like corpus: the first stories of gpu_kit/data's .txt (scripts/gpu_wheels.sh copies
               ../shared/data/tinystories there), else synthetic stories (gptoss.data.synthetic), tokenized with
               gptoss.tokenizer into the trainer's format: no `datasets` needed
  train        the README's main command at nano size: `python -m deepspeed.launcher.runner --num_gpus 1
               launch/train.py --ds_config a40.json --vocab data` (story-aware attention, the default; a warmup
               that fits the few steps), a checkpoint halfway and at the end: time to first step, tokens/s, MFU,
               peak memory; then `--resume` from the halfway checkpoint, its losses against the uninterrupted
               run's
  export       the run exported, loaded by transformers, greedy tokens equal to our sampler's; one sampled story
  decode       our decode step, eager and compiled (CUDA graphs), against transformers' generate on one export:
               tokens/s, tokens equal (bench/gpu_check_decode.py)
  peer         the same model (our data vocabulary) and batch as a transformers GptOssForCausalLM training step:
               tokens/s ratio
  variants     the main run again with --compile (tokens/s against eager; inductor, or aot_eager in a dry run)
               and with --activation_checkpointing

A stage that fails gives a FAIL row and the others still run; exit status 1 if any row failed, 2 without CUDA
(unless --dry_run). Stages that would overrun --budget_s are skipped with a row saying so. Fill gpu_kit/ first,
where pip reaches PyPI: scripts/gpu_wheels.sh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
from gpu_check_decode import decode_speed
from gpu_check_harness import DRY, GPU, KIT, PROMPT, Check, free_memory, need
from gpu_check_kernels import attention_parity, loss_parity
from gpu_check_platform import device_choice, expert_gating
from gpu_check_runs import peer_step, prepare_data, resume, train_default, train_variants

# ---- environment -------------------------------------------------------------------------------------------

def environment(ck: Check) -> None:
    import torch

    if ck.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    else:
        gpu = f"none (dry run on CPU: {common.cpu_model()}, {os.cpu_count()} cores)"
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    ck.add("environment", gpu, f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA "
           f"{torch.version.cuda or 'none'}, transformers {tf}")
    try:
        import deepspeed

        ck.add("DeepSpeed", deepspeed.__version__, "already installed")
        return
    except ImportError:
        pass
    wheels = Path(ck.args.wheels)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "deepspeed"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. a read-only site-packages: install the kit's wheels into a folder of ours
        site = ck.work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
               *map(str, sorted(wheels.glob("*.whl")))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not install DeepSpeed from {wheels}: {proc.stderr.strip()[-300:]}")
    import importlib

    importlib.invalidate_caches()
    import deepspeed

    ck.add("DeepSpeed", deepspeed.__version__, f"installed from {wheels} ({len(list(wheels.glob('*.whl')))} wheels, "
           "pip --no-index)")


# ---- export, greedy equality, a story ----------------------------------------------------------------------

def export_and_greedy(ck: Check) -> None:
    import torch
    import transformers

    from gptoss.export import export
    from gptoss.generate import generate, load_model
    from gptoss.model import ModelOptions
    from gptoss.tokenizer import EOT_ID, encode

    t0 = time.perf_counter()
    out = export(need(ck, "run", "train"), ck.work / "export", dtype="fp32", progress=False, tokenizer="no")
    seconds = time.perf_counter() - t0
    # the weights are under test here; the kernels had their own rows
    ours = load_model(out, ck.device, "fp32", options=ModelOptions(attention="eager"))
    ck.found["model"] = ours
    hf = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                        attn_implementation="eager").to(ck.device).eval()
    prompt = [EOT_ID, *encode(PROMPT)]
    n = ck.sizes.greedy_tokens
    eos = hf.generation_config.eos_token_id
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt], device=ck.device), max_new_tokens=n, do_sample=False,
                             pad_token_id=EOT_ID)[0, len(prompt):].tolist()
    mine = generate(ours, prompt, n, temperature=0, stop_ids=stops)
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    ok = mine == theirs
    ck.add("export + transformers greedy", f"ok: {same}/{len(theirs)} tokens equal" if ok else
           f"FAIL: tokens differ from position {same}",
           f"export (fp32) in {seconds:.1f} s; transformers {transformers.__version__} eager attention vs our KV-cache "
           f"sampler, fp32 on {ck.device.type}, prompt {PROMPT!r}")
    del hf
    free_memory(ck)


def story(ck: Check) -> None:
    from gptoss.generate import sample_text

    model = need(ck, "model", "export + greedy")
    text = sample_text(ck.work / "export", PROMPT, max_new_tokens=ck.sizes.story_tokens, temperature=0.8,
                       top_k=200, seed=0, write=lambda _: None, model=model)[0]
    ck.add("sampled story", f"{len(text)} characters",
           f"temperature 0.8, top-k 200, seed 0, after {ck.sizes.steps} steps: {text[:600]}")


# (name, stage, seconds it needs on the GPU: skipped with less left of --budget_s); one line adds a stage. What
# users run first (train, resume, export, sampling), the comparisons with other settings and peers last.
STAGES: list[tuple[str, Callable[[Check], None], float]] = [
    ("environment", environment, 0), ("attention parity", attention_parity, 60), ("head loss", loss_parity, 40),
    ("device choice", device_choice, 20), ("expert kernels", expert_gating, 15), ("data", prepare_data, 15),
    ("train", train_default, 60), ("resume", resume, 40), ("export + greedy", export_and_greedy, 20),
    ("sampled story", story, 5), ("decode speed", decode_speed, 120), ("transformers step", peer_step, 30),
    ("train variants", train_variants, 90),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.md", help="markdown file for the table (default: %(default)s)")
    p.add_argument("--dry_run", action="store_true", help="every stage on CPU at toy size (proves the script)")
    p.add_argument("--budget_s", type=float, default=480.0, help="stop starting stages after this (default: 480)")
    p.add_argument("--wheels", default=str(KIT / "wheels"), help="wheels for pip --no-index (scripts/gpu_wheels.sh)")
    p.add_argument("--data", default=str(KIT / "data"), help="a folder with TinyStories' train.txt + valid.txt "
                   "(default: %(default)s); without them the check trains on synthetic stories")
    p.add_argument("--work", default=None, help="scratch dir (default: a temporary one, removed at the end)")
    args = p.parse_args()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("GPTOSS_COMPILE_BACKEND", "aot_eager")  # --compile's run: inductor takes minutes on CPU
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device; --dry_run runs every stage on CPU at toy size", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    ck = Check(args, DRY if args.dry_run else GPU, work, torch.device("cpu" if args.dry_run else "cuda"))
    try:
        for name, fn, need_s in STAGES:
            ck.stage(name, fn, need_s)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = sum(r[1].startswith("FAIL") for r in ck.rows)
    title = (f"gpu_check.py{' --dry_run' if args.dry_run else ''}: {len(ck.rows)} rows, {failed} failed, "
             f"{time.monotonic() - ck.t0:.0f} s")
    text = f"{title}\n\n{ck.table()}\n"
    print(text)
    Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
