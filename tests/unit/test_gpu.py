"""What only a GPU can show (`pytest -m gpu`; every test here is skipped without CUDA): FlexAttention's compiled
kernels with sinks, forward and backward, against eager attention in bf16; the expert kernels against the
loop in bf16 with idle experts; one DeepSpeed bf16 ZeRO-2 step of the
real trainer with the shipped A40 config (no DeepSpeed op built); the model under torch.compile against eager;
activation checkpointing's memory, measured by the CUDA allocator.

DeepSpeed must be importable (bench/gpu_check.py installs it from gpu_kit/wheels on a machine without it)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import REPO, launch, ok, read_metrics, train_flags

from gptoss.config import get_config
from gptoss.model import ModelOptions, build_model
from gptoss.model.kernels.attention import eager_attention, flex_attention_with_sinks
from gptoss.model.kernels.experts import EXPERT_KERNELS, expert_kernel, grouped_mm_supported
from gptoss.model.moe import Expert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment for a one-process run on the GPU (no DS_ACCELERATOR=cpu, no launcher variables)."""
    drop = ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra}


@pytest.mark.parametrize("window", [128, None], ids=["sliding", "full"])
def test_flex_attention_with_sinks_forward_and_backward_match_eager_in_bf16(window):
    """nano's shape (8 query heads, 1 kv head, head_dim 64) over T=1024: FlexAttention (compiled, sink folded in
    through the log-sum-exp) stays as close to the fp32 result as eager attention in bf16 does."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 8, 1024, 64), (2, 1, 1024, 64), (2, 1, 1024, 64), (8,)]
    base = [torch.randn(*s, generator=g) for s in shapes]
    grad_out = torch.randn(2, 8, 1024, 64, generator=g).cuda()

    def forward_backward(flex: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        q, k, v, sinks = (t.cuda().to(dtype).requires_grad_() for t in base)
        out = (flex_attention_with_sinks(q, k, v, sinks, 0.125, window) if flex else
               eager_attention(q, k, v, sinks, 0.125, window))
        out.float().backward(grad_out)
        return [out.detach().float()] + [t.grad.float() for t in (q, k, v, sinks)]

    ref = forward_backward(False, torch.float32)
    eager, flex = forward_backward(False, torch.bfloat16), forward_backward(True, torch.bfloat16)
    for name, r, e, f in zip(("out", "dq", "dk", "dv", "dsinks"), ref, eager, flex):
        scale = r.abs().max().item()
        eager_err, flex_err = (e - r).abs().max().item() / scale, (f - r).abs().max().item() / scale
        assert flex_err <= 2 * eager_err + 1e-3, (name, flex_err, eager_err)


@pytest.mark.parametrize("name", ["grouped", "masked_dense"])
def test_expert_kernel_matches_the_loop_in_bf16_with_idle_experts(name):
    """nano's experts (8 x 512 -> 1024) on 8,192 uneven rows, experts 1 and 4 idle: each kernel's output and
    gradients (rows and every weight) as close to the fp32 loop as the bf16 loop is, idle experts' weight
    gradients exactly 0; expert_kernel picks grouped exactly where grouped_mm_supported says (Hopper)."""
    cfg = get_config("nano")
    h, inter, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    torch.manual_seed(0)
    fp32 = torch.nn.ModuleList(Expert(h, inter, cfg.swiglu_alpha, cfg.swiglu_limit) for _ in range(E)).cuda()
    for p in fp32.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02 if p.dim() > 1 else 0.1)
    bf16 = torch.nn.ModuleList(Expert(h, inter, cfg.swiglu_alpha, cfg.swiglu_limit) for _ in range(E)).cuda()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.bfloat16()
    counts = torch.tensor([1500, 0, 2500, 700, 0, 1, 2991, 499], device="cuda")
    x = torch.randn(int(counts.sum()), h, device="cuda")
    grad_out = torch.randn_like(x)

    def run(kernel: str, experts: torch.nn.ModuleList) -> list[torch.Tensor]:
        xs = x.to(next(experts.parameters()).dtype).requires_grad_()
        params = [xs, *experts.parameters()]
        y = EXPERT_KERNELS[kernel](experts, xs, counts)
        grads = torch.autograd.grad((y.float() * grad_out).sum(), params, allow_unused=True)
        return [y.detach().float()] + [torch.zeros_like(p).float() if g is None else g.float()
                                       for g, p in zip(grads, params)]

    ref, loop, got = run("loop", fp32), run("loop", bf16), run(name, bf16)
    for r, lo, g in zip(ref, loop, got):
        scale = r.abs().max().item() or 1.0
        assert (g - r).abs().max().item() <= 2 * (lo - r).abs().max().item() + 1e-3 * scale
    per_expert = len(list(bf16[0].parameters()))
    idle = [got[2 + e * per_expert + i] for e in (1, 4) for i in range(per_expert)]
    assert all(bool((g == 0).all()) for g in idle)
    chosen = expert_kernel(x.bfloat16(), h, inter)
    cap = torch.cuda.get_device_capability()
    assert (chosen is EXPERT_KERNELS["grouped"]) == grouped_mm_supported(cap, torch.bfloat16, h, inter) == (cap[0] == 9)


def test_one_deepspeed_bf16_zero2_step_with_the_a40_config(tiny_data, tmp_path):
    """The shipped config on CUDA: bf16, ZeRO-2, torch's fused AdamW, fp32 gradient accumulation (4 micro-batches
    on one GPU); two real steps, the second applied, GPU memory and MFU reported, and no DeepSpeed op built."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    out = tmp_path / "run"
    flags = train_flags(tiny_data, out, "--eval_every", "2", "--save_every", "0", steps=2)
    flags[flags.index("--ds_config") + 1] = str(REPO / "ds_configs" / "a40.json")
    ok(launch(REPO / "launch" / "train.py", *flags, env=gpu_env(TORCH_EXTENSIONS_DIR=str(ext))))
    assert list(ext.iterdir()) == []
    m = read_metrics(out)
    assert sorted(m) == [1, 2] and not any(r["skipped"] for r in m.values())
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["mem_gpu_gib"] > 0 for r in m.values())
    assert math.isfinite(m[2]["val_loss"])
    from gptoss.train.metrics import PEAK_FLOPS

    assert (m[2]["mfu"] is not None) == (torch.cuda.get_device_name() in PEAK_FLOPS)
    assert json.loads((out / "run_args.json").read_text())["gradient_accumulation_steps"] == 4


def test_compiled_model_matches_eager():
    """torch.compile (inductor) of the whole model on CUDA gives eager's loss and gradients (fp32)."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny", vocab_size=512)).cuda()
    x = torch.randint(0, 512, (4, 129), device="cuda")

    def loss_and_grads(m: torch.nn.Module) -> list[torch.Tensor]:
        out = m(x[:, :-1], targets=x[:, 1:])
        loss = out.loss + out.aux_loss
        return [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))

    ref = loss_and_grads(model)
    got = loss_and_grads(torch.compile(model))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_train_compile_flag_matches_eager(tiny_data, tmp_path):
    """train.py --compile (inductor, every block) on CUDA: the losses of the run without it."""
    runs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"run{len(flag)}"
        ok(launch(REPO / "launch" / "train.py", *train_flags(tiny_data, out, "--eval_every", "0", *flag, steps=3),
                  env=gpu_env()))
        runs[bool(flag)] = read_metrics(out)
    for step in (1, 2, 3):
        assert runs[True][step]["loss"] == pytest.approx(runs[False][step]["loss"], rel=1e-4)


def test_activation_checkpointing_lowers_peak_gpu_memory():
    """The same loss (fp32) and a lower torch.cuda.max_memory_allocated for a training step of 8 blocks."""
    cfg = get_config("tiny", vocab_size=512, hidden_size=256, num_hidden_layers=8, max_position_embeddings=2048)
    x = torch.randint(0, 512, (8, 2049), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, options=ModelOptions(activation_checkpointing=enabled)).cuda().train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = model(x[:, :-1], targets=x[:, 1:])
        (out.loss + out.aux_loss).backward()
        torch.cuda.synchronize()
        results.append((out.loss.item(), torch.cuda.max_memory_allocated() - base))
        del model, out
        torch.cuda.empty_cache()
    (plain_loss, plain_peak), (ckpt_loss, ckpt_peak) = results
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-5)
    assert ckpt_peak < 0.7 * plain_peak, (plain_peak / 2**20, ckpt_peak / 2**20)


@pytest.mark.parametrize("rows", [201088, 8600], ids=["full-vocab", "data-vocab"])
def test_fused_loss_matches_chunked_on_cuda_in_bf16(rows):
    """nano's head on CUDA in bf16 (4,096 tokens, hidden 512; 8,600 rows: a data vocabulary and its tail): the fused
    loss is as close to all-logits fp32 as the chunked loss is, for the loss
    and both gradients, with grad_output 0.5; at the full vocabulary (several chunks) it also peaks lower."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import bench_loss

    inputs = bench_loss.make_inputs(4096, 512, rows, "cuda")
    impls = ["plain", "chunked", "fused"]
    err = bench_loss.parity(impls, torch.bfloat16, *inputs)
    for impl in impls[2:]:
        for got, chunked in zip(err[impl], err["chunked"]):
            assert got <= 2 * chunked + 1e-3, (impl, err)
    if rows < 201088:
        return
    h, w, t, log_tail = inputs
    peaks = {impl: bench_loss.measure(impl, h.bfloat16(), w.bfloat16(), t, log_tail, repeats=1)["extra"]
             for impl in ("chunked", "fused")}
    assert peaks["fused"] <= peaks["chunked"], peaks
