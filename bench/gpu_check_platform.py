"""gpu_check's platform stages: which GPU a rank takes when srun binds one GPU per task (LOCAL_RANK 1, one GPU
visible), with the NCCL error handling it starts with; and which expert kernel runs here, each kernel against
the loop on rows where some experts are idle, and what the loop's host sync costs per layer. Run as a script,
this file is device_choice's subprocess: it prints one JSON line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import common
from gpu_check_harness import REPO, Check, free_memory, sync

# ---- the device a rank takes -------------------------------------------------------------------------------

def init_child() -> None:
    """init_distributed as the trainer calls it, then one all-reduce on the group; prints what it chose."""
    import torch
    import torch.distributed as dist

    from gptoss.train.distributed import init_distributed

    init_distributed(timeout_min=2)
    cuda = torch.cuda.is_available()
    x = torch.ones(1, device=f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    dist.all_reduce(x)
    found = {"backend": dist.get_backend(), "world": dist.get_world_size(), "visible": torch.cuda.device_count(),
             "device": torch.cuda.current_device() if cuda else None, "sum": x.item(),
             "nccl_async": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")}
    dist.destroy_process_group()
    print(json.dumps(found), flush=True)


def device_choice(ck: Check) -> None:
    """srun --gpus-per-task=1: each task sees one GPU while LOCAL_RANK is its place on the node (here 1)."""
    cuda = ck.device.type == "cuda"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    layout = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if cuda:  # the first GPU this process may use, alone
        layout["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_NCCL_ASYNC_ERROR_HANDLING"}  # the default, not a user's
    env.update(layout, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=max(60.0, min(180.0, ck.left())))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"init_distributed with LOCAL_RANK=1 exited {proc.returncode}: {tail[:250]}")
    got = json.loads(lines[-1])
    if cuda:
        ok = (got["backend"], got["visible"], got["device"], got["nccl_async"]) == ("nccl", 1, 0, "2")
        result = (f"cuda:{got['device']} of {got['visible']} visible, "
                  f"TORCH_NCCL_ASYNC_ERROR_HANDLING={got['nccl_async']}")
        expect = "cuda:0 (gptoss.train.distributed.cuda_device) and 2 (NCCL_ENV)"
    else:
        ok, expect = got["backend"] == "gloo", "the group starts (gloo)"
        result = f"init_distributed with LOCAL_RANK=1 on {got['backend']}; device n/a on CPU"
    ck.add("device choice: LOCAL_RANK=1, one GPU visible", f"{'ok' if ok else 'FAIL'}: {result}",
           f"a subprocess with {' '.join(f'{k}={v}' for k, v in layout.items())} and no "
           "TORCH_NCCL_ASYNC_ERROR_HANDLING of its own: gptoss.train.distributed.init_distributed "
           f"({got['backend']}, world {got['world']}), one all-reduce (sum {got['sum']:g}), destroy_process_group, "
           f"in {time.perf_counter() - t0:.1f} s; pass: {expect}")


# ---- the expert kernel -------------------------------------------------------------------------------------

def _kernel_name(kernel: Any) -> str:
    from gptoss.model.kernels.experts import EXPERT_KERNELS

    return next(name for name, fn in EXPERT_KERNELS.items() if fn is kernel)


def _idle_counts(experts: int, rows: int, seed: int = 0) -> Any:
    """Rows per expert, uneven, every third expert from the second on idle (0 rows)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    busy = [e for e in range(experts) if e % 3 != 1]
    cuts = sorted(torch.randint(0, rows + 1, (len(busy) - 1,), generator=g).tolist())
    counts = torch.zeros(experts, dtype=torch.int64)
    counts[busy] = torch.tensor([b - a for a, b in zip([0, *cuts], [*cuts, rows])])
    return counts


def expert_gating(ck: Check) -> None:
    """The kernel expert_kernel picks for nano in bf16 here; then grouped (torch._grouped_mm: its fast kernel on
    9.x/10.x, its syncing fallback elsewhere) and masked dense against the loop, bf16, forward + backward, with
    idle experts: output and gradient errors, times; then the loop's host sync per layer."""
    import copy

    import torch

    from gptoss.config import get_config
    from gptoss.model.kernels.experts import EXPERT_KERNELS, expert_kernel
    from gptoss.model.moe import Expert

    cap = torch.cuda.get_device_capability(ck.device) if ck.device.type == "cuda" else None
    where = f"sm_{cap[0]}{cap[1]}" if cap else "CPU"
    nano = get_config("nano")
    chosen = _kernel_name(expert_kernel(torch.empty(1, nano.hidden_size, dtype=torch.bfloat16, device=ck.device),
                                        nano.hidden_size, nano.intermediate_size))
    not_chosen = "" if chosen == "grouped" else f"; grouped: not chosen on {where}"
    ck.add("expert kernel for nano, bf16", chosen + not_chosen,
           f"gptoss.model.kernels.experts.expert_kernel for hidden {nano.hidden_size}, intermediate "
           f"{nano.intermediate_size} in bf16 on {ck.device.type}; compute capability "
           f"{f'{cap[0]}.{cap[1]}' if cap else 'none'}, torch._grouped_mm "
           f"{'present' if hasattr(torch, '_grouped_mm') else 'absent'} (grouped_mm_supported: 9.x only, bf16, "
           "16-byte aligned rows: elsewhere torch's kernel syncs on every call or, on 10.x, gives idle experts "
           "weight gradients)")

    cfg = get_config(ck.sizes.model)
    h, inter, rows = cfg.hidden_size, cfg.intermediate_size, ck.sizes.expert_rows
    torch.manual_seed(0)
    fp32 = torch.nn.ModuleList(Expert(h, inter, cfg.swiglu_alpha, cfg.swiglu_limit)
                               for _ in range(cfg.num_local_experts)).to(ck.device)
    for p in fp32.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02 if p.dim() > 1 else 0.1)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    counts = _idle_counts(cfg.num_local_experts, rows).to(ck.device)
    x = torch.randn(rows, h, device=ck.device)
    grad_out = torch.randn(rows, h, device=ck.device)
    names = [n for n, _ in fp32[0].named_parameters()]

    def forward_backward(kernel: str, experts: torch.nn.ModuleList) -> tuple[Any, list[Any]]:
        xs = x.to(next(experts.parameters()).dtype).requires_grad_()
        params = [xs, *experts.parameters()]
        y = EXPERT_KERNELS[kernel](experts, xs, counts)
        grads = torch.autograd.grad((y.float() * grad_out).sum(), params, allow_unused=True)
        return y, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    def run(kernel: str, experts: torch.nn.ModuleList) -> dict[str, Any]:
        """Output and gradients (x, then each weight name stacked over the experts), in fp32."""
        y, grads = forward_backward(kernel, experts)
        per_name = {n: torch.stack([g.float() for g in grads[1 + i::len(names)]]) for i, n in enumerate(names)}
        return {"out": y.detach().float(), "x": grads[0].float(), **per_name}

    def step(kernel: str) -> None:
        forward_backward(kernel, bf16)
        sync(ck)

    cuda = ck.device.type == "cuda"
    ref, loop = run("loop", fp32), run("loop", bf16)
    idle = (counts == 0).nonzero().flatten().tolist()
    bf16_err = {k: (loop[k] - ref[k]).abs().max().item() for k in loop}
    times = common.interleaved_best({k: lambda k=k: step(k) for k in EXPERT_KERNELS}, repeats=10 if cuda else 2)
    for other in ("grouped", "masked_dense"):
        cand = run(other, bf16)
        idle_zero = all(bool((r[n][idle] == 0).all()) for r in (loop, cand) for n in names)
        delta = {k: (cand[k] - loop[k]).abs().max().item() for k in loop}
        ok = idle_zero and all(delta[k] <= 2 * bf16_err[k] + 1e-3 * ref[k].abs().max().item() for k in delta)
        speed = times["loop"].best / times[other].best
        ck.add(f"experts {other} vs loop, bf16, idle experts",
               f"{'ok' if ok else 'FAIL'}: {other} {speed:.2f}x the loop's speed" + ("; chosen" if other == chosen
                                                                                     else ""),
               f"{ck.sizes.model} experts ({cfg.num_local_experts} x {h} -> {inter}), {rows:,} rows, counts "
               f"{counts.tolist()}: max |Δ| {other} vs loop: " + ", ".join(f"{k} {v:.1e}" for k, v in delta.items())
               + f"; idle experts {idle}: weight gradients exactly 0 in both: {'yes' if idle_zero else 'NO'}; "
               f"forward + backward {other} {times[other].best * 1e3:.2f} ms, loop {times['loop'].best * 1e3:.2f} ms "
               f"(best of {len(times['loop'].seconds)}); pass: within 2x the loop's bf16 error vs fp32 + 1e-3 x max")
        del cand
    _loop_sync_cost(ck, bf16, x, counts, cfg.num_hidden_layers)
    free_memory(ck)


def _loop_sync_cost(ck: Check, experts: Any, x: Any, counts: Any, layers: int) -> None:
    """A stack of `layers` layers, each a matmul queued ahead of the looped experts, forward + backward: with the
    counts on the device (the loop's counts.tolist() waits for the queue, then the GPU idles while Python
    launches the experts' kernels) against the same counts already on the host (no sync)."""
    import torch

    from gptoss.model.kernels.experts import looped_experts

    h = x.shape[1]
    w = (torch.randn(h, h, device=x.device) * h ** -0.5).to(torch.bfloat16)
    host = counts.cpu()

    def stack(c: Any) -> None:
        y = x.to(torch.bfloat16).requires_grad_()
        for _ in range(layers):
            y = looped_experts(experts, torch.nn.functional.linear(y, w), c)
        y.float().square().mean().backward()
        sync(ck)

    cuda = ck.device.type == "cuda"
    t = common.interleaved_best({"device": lambda: stack(counts), "host": lambda: stack(host)},
                                repeats=10 if cuda else 2)
    per_layer = (t["device"].best - t["host"].best) / layers
    result = (f"{per_layer * 1e3:.3f} ms per layer ({per_layer / (t['device'].best / layers):.0%} of a layer's "
              "forward + backward here)" if cuda else "n/a on CPU (no device queue to drain)")
    ck.add("expert loop: host sync per layer", result,
           f"{layers} layers of (matmul, looped experts), forward + backward, {x.shape[0]:,} rows: counts on the "
           f"device {t['device'].best * 1e3:.2f} ms (counts.tolist() syncs once per layer), on the host "
           f"{t['host'].best * 1e3:.2f} ms (best of {len(t['host'].seconds)}); a micro-batch pays it once per MoE "
           f"layer in forward, twice with --activation_checkpointing")


if __name__ == "__main__":
    init_child()
