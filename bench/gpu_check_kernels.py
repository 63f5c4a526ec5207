"""gpu_check's parity stages: FlexAttention with sinks against eager attention, and the head loss (chunked,
fused) against plain cross-entropy, in bf16; then the losses' time and peak memory."""

from __future__ import annotations

from typing import Any

from gpu_check_harness import Check, free_memory


def _errors(got: tuple[Any, list[Any]], ref: tuple[Any, list[Any]]) -> tuple[float, float]:
    """(max |Δ| of the outputs, max over the inputs of max |Δ| of the gradients / max |gradient|)."""
    fwd = (got[0] - ref[0]).abs().max().item()
    bwd = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got[1], ref[1])) \
        if ref[1] else float("nan")
    return fwd, bwd


def attention_parity(ck: Check) -> None:
    import torch

    from gptoss.model.kernels.attention import eager_attention, flex_attention_with_sinks

    nkv, nh, T, d, window = ck.sizes.attn
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, n, T, d, generator=g) for n in (nh, nkv, nkv)] + [torch.randn(nh, generator=g)]
    grad_out = torch.randn(2, nh, T, d, generator=g).to(ck.device)
    backward = ck.device.type == "cuda"  # FlexAttention has no CPU backward
    scale = d ** -0.5
    for w in (window, None):
        def run(kernel: str, dtype: torch.dtype, w: int | None = w) -> tuple[Any, list[Any]]:
            ts = [t.to(ck.device, dtype).requires_grad_(backward) for t in inputs]
            if kernel == "flex":
                out = flex_attention_with_sinks(*ts, scale, w)
            else:
                out = eager_attention(*ts, scale, w)
            grads = torch.autograd.grad((out.float() * grad_out).sum(), ts) if backward else []
            return out.detach().float(), [x.float() for x in grads]

        ref = run("eager", torch.float32)
        flex, eager = _errors(run("flex", torch.bfloat16), ref), _errors(run("eager", torch.bfloat16), ref)
        ok = flex[0] <= 2 * eager[0] + 1e-3 and (not backward or flex[1] <= 2 * eager[1] + 1e-3)
        bwd = (f"; backward max |Δ|/max|grad| flex {flex[1]:.1e}, eager bf16 {eager[1]:.1e}" if backward else
               "; backward n/a on CPU (FlexAttention has none)")
        ck.add(f"attention parity, {'sliding W=' + str(w) if w else 'full causal'}, bf16", "ok" if ok else "FAIL",
               f"FlexAttention+sinks vs fp32 eager: forward max |Δ| {flex[0]:.1e} (eager bf16: {eager[0]:.1e})"
               f"{bwd}; B=2, {nh}/{nkv} heads, T={T}, d={d}; pass: within 2x eager bf16's error + 1e-3")


def loss_parity(ck: Check) -> None:
    """The head loss: each implementation in bf16 against all logits at once in fp32 (at nano's vocabulary and at a
    data vocabulary with its tail), then forward + backward time and peak memory at nano's vocabulary."""
    import bench_loss
    import torch

    n, hidden, vocab, chunk = ck.sizes.loss
    impls = ["plain", "chunked", "fused"]
    ok, parts = True, []
    for rows in (vocab, vocab // 23):  # 201,088: the full vocabulary; 8,743: a data vocabulary and its tail row
        inputs = bench_loss.make_inputs(n, hidden, rows, ck.device)
        err = bench_loss.parity(impls, torch.bfloat16, *inputs, chunk_tokens=chunk)
        plain = err.pop("plain")
        ok &= all(e[0] <= 2 * plain[0] + 1e-3 and e[1] <= 2 * plain[1] + 1e-3 for e in err.values())
        parts.append(f"{rows:,} rows{' + tail' if inputs[3] else ''}: loss |Δ| / grads max |Δ|/max " + ", ".join(
            f"{k} {e[0]:.1e} / {e[1]:.1e}" for k, e in err.items()) + f" (plain bf16 {plain[0]:.1e} / {plain[1]:.1e})")
        del inputs
        free_memory(ck)
    h, w, t, _ = bench_loss.make_inputs(n, hidden, vocab, ck.device)
    h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)
    cuda, timed = ck.device.type == "cuda", {}
    for impl in impls[1:]:
        timed[impl] = bench_loss.measure(impl, h, w, t, None, repeats=5 if cuda else 2, chunk_tokens=chunk)
        free_memory(ck)
    base = timed["chunked"]

    def cell(impl: str) -> str:
        r = timed[impl]
        mem = f", {r['extra'] / 2**30:.2f} GiB peak" if cuda else ""
        return f"{impl} {r['best'] * 1e3:.1f} ms ({base['best'] / r['best']:.2f}x){mem}"

    fused = timed["fused"]
    mem = f", {fused['extra'] / base['extra']:.2f}x its peak memory" if cuda else " (memory: n/a on CPU)"
    result = f"{'ok' if ok else 'FAIL'}: fused {base['best'] / fused['best']:.2f}x chunked's speed{mem}"
    ck.add("head loss (chunked, fused) vs plain cross-entropy, bf16", result,
           "; ".join(parts) + f"; pass: within 2x plain bf16's error + 1e-3. Forward + backward at {vocab:,} rows, "
           f"{n} tokens, hidden {hidden}, bf16 (best of {5 if cuda else 2}): " + ", ".join(map(cell, timed))
           + " (--loss_impl auto is fused on CUDA)")
