"""The head's loss kernels beyond the table test of tests/unit/test_kernels.py: bf16 against fp32, frozen inputs, no
gradients wanted, all targets ignored, a whole model step fused vs chunked, and the --loss_impl choice from the
model options to launch/train.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TRAIN, call_main, launch, ok, read_metrics, train_flags

from gptoss.config import get_config
from gptoss.data import kept_set
from gptoss.model import ModelOptions, build_model
from gptoss.model.kernels.head_loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    fused_linear_cross_entropy,
    loss_kernel,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, HIDDEN, ROWS, TAIL_N = 40, 16, 97, 5  # with the tail: 96 kept rows + 1 row for TAIL_N ids


def inputs(dtype: torch.dtype = torch.float32, tail: bool = False, seed: int = 0):
    """hidden, weight, targets with ignored rows (and, with the tail, targets on the tail row)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, HIDDEN, generator=g)
    w = torch.randn(ROWS, HIDDEN, generator=g) * 0.5
    t = torch.randint(0, ROWS, (TOKENS,), generator=g)
    t[::6] = IGNORE_INDEX
    if tail:
        t[1::4] = ROWS - 1
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), t


def loss_and_grads(fn, h, w, t, scale: float = 0.25):
    """The loss and d(scale x loss)/d(hidden, weight): DeepSpeed's 1/accumulation scaling makes grad_output != 1."""
    loss = fn(h, w, t)
    return [loss.detach().float()] + [g.float() for g in torch.autograd.grad(loss * scale, (h, w))]


def close(got, ref, rtol: float, atol: float) -> None:
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_batched_hidden_and_a_frozen_input():
    """(B, T, h) hidden like the model's; with the weight frozen only hidden gets a gradient (and vice versa)."""
    h, w, t = inputs()
    h3, t3 = h.detach().reshape(4, 10, HIDDEN).requires_grad_(), t.reshape(4, 10)
    ref = loss_and_grads(chunked_cross_entropy, h, w, t)
    loss = fused_linear_cross_entropy(h3, w.detach(), t3, chunk_tokens=16)
    (dh,) = torch.autograd.grad(loss * 0.25, h3)
    close([loss.detach(), dh.reshape(TOKENS, HIDDEN)], ref[:2], rtol=1e-6, atol=1e-6)
    loss = fused_linear_cross_entropy(h.detach(), w, t, chunk_tokens=16)
    (dw,) = torch.autograd.grad(loss * 0.25, w)
    close([dw], ref[2:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tail", [False, True], ids=["full", "tail"])
def test_bf16_within_bf16_tolerance_of_fp32(tail):
    """bf16 inputs: the fused loss is as close to the fp32 result as the chunked loss in bf16 is."""
    lt = math.log(TAIL_N) if tail else None
    ref = loss_and_grads(lambda *a: chunked_cross_entropy(*a, log_tail_size=lt), *inputs(tail=tail))
    errors = {}
    for name, fn in (("fused", fused_linear_cross_entropy), ("chunked", chunked_cross_entropy)):
        got = loss_and_grads(lambda *a, fn=fn: fn(*a, chunk_tokens=16, log_tail_size=lt),
                             *inputs(torch.bfloat16, tail))
        errors[name] = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]
    for fused, chunked in zip(errors["fused"], errors["chunked"]):
        assert fused <= 2e-2 and fused <= 2 * chunked + 2e-3, errors


@pytest.mark.parametrize("chunk", [16, 1000], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("name", ["chunked", "fused"])
def test_pad_rows_before_the_tail_are_masked_out(name, chunk):
    """PAD rows between the kept rows and the tail (non-zero here: the mask alone removes them) give the loss and
    gradients of the weight without them, and exactly zero gradient themselves."""
    pad, lt = 31, math.log(TAIL_N)
    h, w, t = inputs(tail=True)
    extra = torch.randn(pad, HIDDEN, generator=torch.Generator().manual_seed(5))
    w_pad = torch.cat([w.detach()[:-1], extra, w.detach()[-1:]]).requires_grad_()
    t_pad = torch.where(t == ROWS - 1, ROWS - 1 + pad, t)
    fn = {"chunked": chunked_cross_entropy, "fused": fused_linear_cross_entropy}[name]
    ref = loss_and_grads(lambda *a: fn(*a, chunk_tokens=chunk, log_tail_size=lt), h, w, t)
    loss, dh, dw = loss_and_grads(lambda *a: fn(*a, chunk_tokens=chunk, log_tail_size=lt, pad_rows=pad),
                                  h, w_pad, t_pad)
    assert w_pad.shape[0] == 128 and torch.count_nonzero(dw[ROWS - 1:-1]) == 0
    close([loss, dh, torch.cat([dw[:ROWS - 1], dw[-1:]])], ref, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # the loss-only walk (validation) masks them too
        torch.testing.assert_close(fn(h, w_pad, t_pad, chunk, lt, pad), ref[0], rtol=1e-6, atol=1e-7)


def test_without_gradients_only_the_loss():
    h, w, t = inputs(tail=True)
    ref = fused_linear_cross_entropy(h, w, t, chunk_tokens=16, log_tail_size=1.0)
    shapes = []
    with torch.no_grad():
        with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(x.shape) or x, lambda x: x):
            loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=16, log_tail_size=1.0)
    frozen = fused_linear_cross_entropy(h.detach(), w.detach(), t, chunk_tokens=16, log_tail_size=1.0)
    assert shapes == [] and loss.grad_fn is None and frozen.grad_fn is None
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen, ref.detach(), rtol=1e-6, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_gradients():
    h, w, t = inputs()
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, h, w, torch.full_like(t, IGNORE_INDEX))
    assert loss.item() == 0 and not dh.any() and not dw.any()


def mixed_targets(kept: list[int] | None, vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    if kept is None:
        return ids
    inside = torch.tensor(kept)[torch.randint(0, len(kept), shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < 0.5, inside, ids)  # kept ids and tail ids both


@pytest.mark.parametrize("data_vocab", [False, True], ids=["full-vocab", "data-vocab"])
@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_one_model_step_fused_equals_chunked(name, data_vocab):
    """Loss and the gradient of every parameter of a whole model, loss_impl fused vs chunked (fp32, CPU)."""
    vocab = 512
    kept = kept_set(torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:60].tolist(), vocab) \
        if data_vocab else None
    ids, targets = mixed_targets(kept, vocab, (2, 24), 1), mixed_targets(kept, vocab, (2, 24), 2)
    targets[0, :3] = IGNORE_INDEX
    results = {}
    for impl in ("chunked", "fused"):
        torch.manual_seed(0)
        model = build_model(get_config(name, vocab_size=vocab, kept_ids=kept), options=ModelOptions(loss=impl)).train()
        out = model(ids, targets)
        loss = out.loss * 0.25 + out.aux_loss
        results[impl] = [out.loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))
    close(results["fused"], results["chunked"], rtol=1e-5, atol=1e-6)


def test_auto_is_fused_on_cuda_and_chunked_elsewhere():
    assert loss_kernel("auto", torch.device("cpu")) is chunked_cross_entropy
    assert loss_kernel("auto", torch.device("cuda")) is fused_linear_cross_entropy
    assert loss_kernel("fused", torch.device("cpu")) is fused_linear_cross_entropy
    model = build_model(get_config("tiny", vocab_size=64), options=ModelOptions(loss="fused"))
    x, t = torch.randn(1, 3, model.config.hidden_size), torch.zeros(1, 3, dtype=torch.long)
    assert model.head.loss(x, model.lm_head.weight, t).item() == pytest.approx(math.log(64), rel=0.2)


def test_train_flag_errors_are_one_line(capsys, monkeypatch, tiny_data, tmp_path):
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", loss_impl="fast")
    assert line == "train.py: error: --loss_impl=fast: expected one of auto, chunked, fused"
    from gptoss.train import arg_parser

    assert "--loss_impl" in arg_parser().format_help() and "fused on CUDA" in arg_parser().format_help()


@pytest.mark.slow
def test_train_runs_with_fused_loss_as_with_chunked(tiny_data, tmp_path):
    """launch/train.py --loss_impl fused vs chunked on CPU DeepSpeed: the same losses; run_args.json records it."""
    runs = {}
    for impl in ("chunked", "fused"):
        out = tmp_path / impl
        ok(launch(TRAIN, *train_flags(tiny_data, out, "--eval_every", "0", "--save_every", "0", "--loss_impl", impl,
                                      steps=3)))
        runs[impl] = read_metrics(out)
        assert json.loads((out / "run_args.json").read_text())["args"]["loss_impl"] == impl
    for step in (1, 2, 3):
        assert runs["fused"][step]["loss"] == pytest.approx(runs["chunked"][step]["loss"], rel=1e-5)
