"""Decoding speed: our KV-cached sampler vs transformers' `generate` on the same exported model.

    python bench/bench_generate.py                          # tiny and nano shapes, vocab 8192, CPU
    python bench/bench_generate.py --models nano --new_tokens 256 --batch 4 --device cuda

Each model is built with random weights, written with `gptoss.export.save_model`, and loaded back by both
sides from that directory: ours with `gptoss.generate.load_model`, transformers' `GptOssForCausalLM` with
eager attention (its sdpa path does not support sinks). Greedy decoding of a random prompt, no stop token,
so every run produces exactly --new_tokens tokens; tokens/s counts new tokens of all rows over wall time
including the prompt pass (best and median of --repeats after one warm-up, the implementations timed
round-robin so a burst of load from other processes hits them alike, after a wait for a quiet machine, see
bench/common.py). Our recompute-everything path (what GPT-2 uses) is shown as the no-cache
reference. "same tokens" says whether ours equals transformers' output. Prints a markdown table with the
command and the machine.

--breakdown profiles one more run of each (torch.profiler, CPU) and adds per new token: the self time of the
weight matmuls (addmm, mm, bmm, ...), of every other aten op, and how many ops the Python code called (top-level
aten ops, each paying the dispatcher); the profiler's own cost inflates both times a little. --compile adds our
step under torch.compile (`generate_batch(compile=True)`, backend GPTOSS_COMPILE_BACKEND, default inductor).
--steps times greedy decode steps alone in one process, round-robin: `forward` with caches at T = 1 (the
general path, which the prompt pass still takes), `decode_step`, the step's weight matmuls by themselves (every
active weight read once), and one matmul over a matrix of the same bytes (how fast this core streams them at
best: the memory-bound floor of any step, ours or transformers').
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from gptoss.config import get_config, param_counts
from gptoss.export import save_model
from gptoss.generate import generate_batch, load_model
from gptoss.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)


def bench_model(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> list[dict]:
    cfg = get_config(name, vocab_size=args.vocab)
    torch.manual_seed(0)
    path = save_model(build_model(cfg), work / name)
    ours = load_model(path, device, "fp32")
    hf = common.hf_causal_lm(path, device)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    runs = {
        "ours, KV cache": lambda: generate_batch(ours, prompts, n, temperature=0),
        "ours, recompute (no cache)": lambda: generate_batch(ours, prompts, n, temperature=0, use_cache=False),
        "transformers generate": lambda: common.hf_greedy(hf, prompts, n),
    }
    if args.compile:
        runs["ours, KV cache, compiled step"] = lambda: generate_batch(ours, prompts, n, temperature=0, compile=True)
    if args.skip_recompute:
        del runs["ours, recompute (no cache)"]
    reference = common.hf_greedy(hf, prompts, n)
    ids = {label: fn() for label, fn in runs.items()}  # the warm-up; greedy gives the same ids every call
    common.wait_until_quiet(args.max_load, args.wait_s)
    timings = common.interleaved_best(runs, args.repeats, warmup=0)
    timed = {label: (timings[label], ids[label]) for label in runs}
    p = param_counts(cfg)
    params = f"{p['total'] / 1e6:.1f}M / {p['active'] / 1e6:.1f}M"
    if args.steps:
        STEP_ROWS.extend([name, label, f"{ms:.2f}"] for label, ms in
                         step_times(ours, prompts.to(device), n, args.repeats).items())
    return [{"model": name, "impl": label, "timing": timing, "same": ids == reference, "params": params,
             "breakdown": breakdown(runs[label], n) if args.breakdown else None}
            for label, (timing, ids) in timed.items()]


STEP_ROWS: list[list[str]] = []  # --steps: model, path, ms/step


def step_times(model: torch.nn.Module, prompts: torch.Tensor, n: int, repeats: int) -> dict[str, float]:
    """Best ms per step of n greedy steps after the prompt: via forward, via decode_step, the matmuls alone."""
    B, T = prompts.shape
    model.prepare_decode()

    @torch.no_grad()
    def steps(via_forward: bool) -> None:
        caches = model.new_caches(B, T + n, torch.float32, prompts.device)
        logits = model(prompts, caches=caches).logits[:, -1]
        position = torch.tensor([T], device=prompts.device)
        for t in range(n):
            nxt = logits.argmax(-1)
            logits = (model(nxt[:, None], caches=caches, start_pos=T + t).logits[:, -1] if via_forward else
                      model.decode_step(nxt, caches, position))
            position += 1

    x, h = torch.randn(B, model.config.hidden_size), torch.randn(B, model.config.intermediate_size)
    reads = []  # (bias, input, weight [in, out]) of every weight matmul of a step, the chosen experts' included
    for block in model.layers:
        w_qkv, b_qkv, w_o, b_o, _ = block.self_attn.decode_weights
        w_r, b_r, _ = block.mlp.decode_weights
        reads += [(b_qkv, x, w_qkv), (b_o, x, w_o), (b_r, x, w_r)]
        for e in block.mlp.local_experts[:block.mlp.top_k]:
            reads += [(e.gate_up_proj_bias, x, e.gate_up_proj), (e.down_proj_bias, h, e.down_proj)]
    reads.append((torch.zeros(model.decode_lm_head.shape[1]), x, model.decode_lm_head))
    # The same bytes as one matrix: what this core streams at best through one matmul, the step's floor.
    total = sum(w.numel() for _, _, w in reads)
    one = torch.randn(model.config.hidden_size, total // model.config.hidden_size)

    @torch.no_grad()
    def matmuls() -> None:
        for _ in range(n):
            for bias, inp, w in reads:
                torch.addmm(bias, inp, w)

    @torch.no_grad()
    def streamed() -> None:
        for _ in range(n):
            x @ one

    timings = common.interleaved_best({"forward with caches, T = 1": lambda: steps(True),
                                       "decode_step": lambda: steps(False), "its weight matmuls alone": matmuls,
                                       f"its {4 * total / 1e6:.1f} MB of weights as one matmul": streamed},
                                      repeats)
    return {label: 1000 * t.best / n for label, t in timings.items()}


MATMULS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot"}


def breakdown(fn, new_tokens: int) -> tuple[float, float, float]:
    """Per new token of one run of fn: ms in weight matmuls, ms in other aten ops (self times), top-level ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    matmul = sum(e.self_cpu_time_total for e in aten if e.key in MATMULS) / 1000
    other = sum(e.self_cpu_time_total for e in aten if e.key not in MATMULS) / 1000
    calls = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    return matmul / new_tokens, other / new_tokens, calls / new_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "nano"], help="presets to time (default: %(default)s)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size, CPU-sized (default: %(default)s)")
    ap.add_argument("--prompt_len", type=int, default=16, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--skip_recompute", action="store_true", help="do not time the no-cache path")
    ap.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    ap.add_argument("--breakdown", action="store_true", help="profile each: matmul / other op ms and ops per token")
    ap.add_argument("--steps", action="store_true", help="time the step alone: via forward, decode_step, matmuls")
    common.add_quiet_machine_args(ap, max_load=1.0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = common.machine_line(common.machine_info())
    if device.type == "cuda":
        header += f" GPU: {torch.cuda.get_device_name(device)}."
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            rows += bench_model(name, args, device, Path(work))
    print(f"Command: `{common.command_line()}`\n\n{header}\n")
    print(f"Greedy, batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, vocab "
          f"{args.vocab}, fp32; tokens/s from the best of {args.repeats} runs (median in brackets).\n")
    table = []
    for r in rows:
        t = r["timing"]
        tok = args.batch * args.new_tokens
        table.append([r["model"], r["params"], r["impl"], f"{tok / t.best:.1f} ({tok / t.median:.1f})",
                      f"{1000 * t.best / args.new_tokens:.2f}", "yes" if r["same"] else "NO"])
        if args.breakdown:
            matmul, other, calls = r["breakdown"]
            table[-1] += [f"{matmul:.2f}", f"{other:.2f}", f"{calls:.0f}"]
    head = ["model", "params total / active", "implementation", "new tokens/s", "ms/step",
            "same tokens as transformers"]
    if args.breakdown:
        head += ["matmul ms/token", "other ops ms/token", "ops/token"]
    print(common.markdown_table(head, table, align="lllrrl" + "rrr" * args.breakdown))
    if STEP_ROWS:
        print(f"\nThe step alone (best of {args.repeats}, round-robin):\n")
        print(common.markdown_table(["model", "greedy step", "ms/step"], STEP_ROWS, align="llr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
