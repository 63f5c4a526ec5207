"""gpu_check's parity stages: FlexAttention with sinks against eager attention, with and without story
(document) masks, and the head loss (chunked, fused) against plain cross-entropy, in bf16; then the losses' time
and peak memory, and whether this torch runs the fused loss at all (its CUDA weight gradient needs torch.addmm's
out_dtype: gptoss.TORCH_FLOOR)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpu_check_harness import Check, free_memory


def _errors(got: tuple[Any, list[Any]], ref: tuple[Any, list[Any]]) -> tuple[float, float]:
    """(max |Δ| of the outputs, max over the inputs of max |Δ| of the gradients / max |gradient|)."""
    fwd = (got[0] - ref[0]).abs().max().item()
    bwd = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got[1], ref[1])) \
        if ref[1] else float("nan")
    return fwd, bwd


def _story_segments(ck: Check, T: int) -> Any:
    """Two rows of T tokens cut into stories as training windows are: row 0 starts mid-story, row 1 at an
    <|endoftext|>; stories from 1 token to longer than the sliding window."""
    import torch

    from gptoss.model.kernels.attention import Segments
    from gptoss.tokenizer import EOT_ID

    ids = torch.zeros(2, T, dtype=torch.long)
    for row, starts in enumerate(([T // 8, T // 8 + 1, T // 3, T // 2 + 5], [0, 3, T // 4, T - T // 6])):
        ids[row, starts] = EOT_ID
    return Segments.from_tokens(ids.to(ck.device), EOT_ID)


def attention_parity(ck: Check) -> None:
    import torch

    from gptoss.model.kernels.attention import eager_attention, flex_attention_with_sinks

    nkv, nh, T, d, window = ck.sizes.attn
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, n, T, d, generator=g) for n in (nh, nkv, nkv)] + [torch.randn(nh, generator=g)]
    grad_out = torch.randn(2, nh, T, d, generator=g).to(ck.device)
    backward = ck.device.type == "cuda"  # FlexAttention has no CPU backward
    scale = d ** -0.5
    for stories in (False, True):
        for w in (window, None):
            def run(kernel: str, dtype: torch.dtype, w: int | None = w,
                    stories: bool = stories) -> tuple[Any, list[Any]]:
                ts = [t.to(ck.device, dtype).requires_grad_(backward) for t in inputs]
                segments = _story_segments(ck, T) if stories else None  # a fresh block-mask cache per run
                fn = flex_attention_with_sinks if kernel == "flex" else eager_attention
                out = fn(*ts, scale, w, segments)
                grads = torch.autograd.grad((out.float() * grad_out).sum(), ts) if backward else []
                return out.detach().float(), [x.float() for x in grads]

            ref = run("eager", torch.float32)
            flex, eager = _errors(run("flex", torch.bfloat16), ref), _errors(run("eager", torch.bfloat16), ref)
            ok = flex[0] <= 2 * eager[0] + 1e-3 and (not backward or flex[1] <= 2 * eager[1] + 1e-3)
            bwd = (f"; backward max |Δ|/max|grad| flex {flex[1]:.1e}, eager bf16 {eager[1]:.1e}" if backward else
                   "; backward n/a on CPU (FlexAttention has none)")
            masks = ("story masks (Segments: 5 and 4 stories in the two rows, the first starting mid-story), "
                     if stories else "no story mask, ")
            ck.add(f"attention parity, {'stories, ' if stories else ''}"
                   f"{'sliding W=' + str(w) if w else 'full causal'}, bf16", "ok" if ok else "FAIL",
                   f"FlexAttention+sinks vs fp32 eager: forward max |Δ| {flex[0]:.1e} (eager bf16: {eager[0]:.1e})"
                   f"{bwd}; {masks}B=2, {nh}/{nkv} heads, T={T}, d={d}; pass: within 2x eager bf16's error + 1e-3")


def loss_parity(ck: Check) -> None:
    """The head loss: each implementation in bf16 against all logits at once in fp32 (at nano's vocabulary and at a
    data vocabulary with its tail), then forward + backward time and peak memory at nano's vocabulary."""
    import bench_loss
    import torch

    n, hidden, vocab, chunk = ck.sizes.loss
    h, w, t, _ = bench_loss.make_inputs(n, hidden, vocab, ck.device)
    h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)
    floor = _fused_against_chunked(ck, h, w, t, chunk)
    impls = ["plain", "chunked", "fused"]
    ok, parts, plain_full = True, [], (0.0, 0.0)
    for rows in (vocab, vocab // 23):  # 201,088: the full vocabulary; 8,743: a data vocabulary and its tail row
        inputs = bench_loss.make_inputs(n, hidden, rows, ck.device)
        err = bench_loss.parity(impls, torch.bfloat16, *inputs, chunk_tokens=chunk)
        plain = err.pop("plain")
        plain_full = plain if rows == vocab else plain_full
        ok &= all(e[0] <= 2 * plain[0] + 1e-3 and e[1] <= 2 * plain[1] + 1e-3 for e in err.values())
        parts.append(f"{rows:,} rows{' + tail' if inputs[3] else ''}: loss |Δ| / grads max |Δ|/max " + ", ".join(
            f"{k} {e[0]:.1e} / {e[1]:.1e}" for k, e in err.items()) + f" (plain bf16 {plain[0]:.1e} / {plain[1]:.1e})")
        del inputs
        free_memory(ck)
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
    floor(plain_full)


def _fused_against_chunked(ck: Check, h: Any, w: Any, t: Any, chunk: int | None) -> Callable[[tuple[float, float]],
                                                                                              None]:
    """torch.__version__ against gptoss.TORCH_FLOOR, and the fused loss forward + backward in bf16 next to chunked
    on the same inputs, counting the torch.addmm calls with out_dtype (on CUDA sm80+ the fused weight gradient's
    fp32 accumulation; torch < 2.10 rejects them). Returns the row's writer, which takes plain bf16's (loss,
    gradient) error against fp32, the parity's yardstick; a fused loss that raises is a FAIL row at once."""
    import bench_loss
    import torch
    from torch.overrides import TorchFunctionMode

    import gptoss

    class AddmmSpy(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            self.calls += func is torch.addmm and "out_dtype" in kwargs
            return func(*args, **kwargs)

    def run(impl: str) -> tuple[Any, list[Any]]:
        loss, grads = bench_loss.step(impl, h.detach().requires_grad_(), w.detach().requires_grad_(), t, None, chunk)
        return loss.float(), [g.float() for g in grads]

    name = "torch floor: fused head loss, bf16 forward + backward vs chunked"
    low = gptoss.torch_version_problem(torch.__version__) is not None
    version = (f"torch {torch.__version__} {'<' if low else '>='} gptoss.TORCH_FLOOR "
               f"{'.'.join(map(str, gptoss.TORCH_FLOOR))}")
    cap = torch.cuda.get_device_capability(h.device) if h.is_cuda else None
    spy = AddmmSpy()
    try:
        chunked = run("chunked")
        with spy:
            fused = run("fused")
    except Exception as e:
        ck.add(name, "FAIL", f"{version}; fused raised {type(e).__name__}: {str(e).strip()[:200]}")
        raise
    loss_d, grad_d = _errors(fused, chunked)
    where = f"CUDA sm_{cap[0]}{cap[1]}" if cap else "CPU"
    want_addmm = cap is not None and cap[0] >= 8  # gptoss.model.kernels.head_loss._accumulate_weight_grad's rule
    addmm = (f"torch.addmm(out_dtype=fp32) called {spy.calls}x on {where}" if want_addmm else
             f"torch.addmm(out_dtype) not used on {where} (mm, then cast; out_dtype runs on CUDA sm80+ only)")
    free_memory(ck)

    def write(plain: tuple[float, float]) -> None:
        ok = (not low and (spy.calls > 0 or not want_addmm) and loss_d <= 4 * plain[0] + 1e-3
              and grad_d <= 4 * plain[1] + 1e-3)
        ck.add(name, f"{'ok' if ok else 'FAIL'}: {version}", f"{addmm}; fused vs chunked at {w.shape[0]:,} rows, "
               f"{h.shape[0]} tokens: loss |Δ| {loss_d:.1e}, grads max |Δ|/max {grad_d:.1e}; pass: torch at the "
               f"floor or above, out_dtype used where CUDA has it, within 4x plain bf16's error vs fp32 "
               f"({plain[0]:.1e} / {plain[1]:.1e}) + 1e-3 (each within 2x of fp32: the parity row's bar)")

    return write
