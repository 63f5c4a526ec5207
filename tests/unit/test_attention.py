"""Attention: the reference `sdpa` against the float64 formula with gradients, its mask, and decoding with KV
caches (ring buffers on sliding layers) against recomputing the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss.config import get_config
from gptoss.model import build_model
from gptoss.model.attention import attention_mask, sdpa

TINY = dict(vocab_size=512)


def naive_attention(q, k, v, sinks, window):
    """Loop-free but obviously-correct float64 formula: p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik))."""
    B, nh, T, d = q.shape
    k = k.repeat_interleave(nh // k.shape[1], 1)
    v = v.repeat_interleave(nh // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = (j <= i) if window is None else (j <= i) & (i - j < window)
    e = torch.where(ok, s.exp(), torch.zeros(()))
    denom = sinks.view(1, -1, 1, 1).exp() + e.sum(-1, keepdim=True)
    return (e / denom) @ v


def qkv(B=2, nh=4, nkv=2, T=37, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, nkv, T, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, nkv, T, d, generator=g, dtype=dtype, requires_grad=True)
    sinks = torch.randn(nh, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v, sinks


@pytest.mark.parametrize("window", [None, 1, 5, 16, 64])
def test_sdpa_matches_formula_forward_and_backward(window):
    q, k, v, s = qkv()
    pos = torch.arange(q.shape[2])
    got = sdpa(q, k, v, s, 1 / math.sqrt(q.shape[-1]), window, pos, pos)
    ref = naive_attention(q, k, v, s, window)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v, s)),
                    torch.autograd.grad(ref.square().sum(), (q, k, v, s))):
        torch.testing.assert_close(a, b)


def test_mask_sees_w_keys_including_itself_and_no_empty_slot():
    pos = torch.arange(6)
    allowed = attention_mask(pos, pos, 3)
    assert allowed.sum(-1).tolist() == [1, 2, 3, 3, 3, 3] and allowed[5, 3:].all() and not allowed[5, 2]
    k_pos = torch.tensor([-1, 4, 5])  # an empty cache slot is never seen
    assert attention_mask(torch.tensor([5]), k_pos, None).tolist() == [[False, True, True]]
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert attention_mask(pos, pos, None, doc, doc).shape == (1, 1, 6, 6)


def test_kv_cache_generation_equals_recompute_across_window():
    torch.manual_seed(2)
    cfg = get_config("tiny", **TINY)
    model = build_model(cfg).eval()
    x = torch.randint(0, 512, (2, 45))
    with torch.no_grad():
        full = model(x).logits
        caches = model.new_caches(2, 45, torch.float32, "cpu")
        steps = [model(x[:, :10], caches=caches).logits]  # a prompt, then one token at a time
        for t in range(10, 45):
            steps.append(model(x[:, t:t + 1], caches=caches, start_pos=t).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert caches[0].k.shape[2] == cfg.sliding_window and caches[1].k.shape[2] == 45


def test_long_prompt_into_ring_buffer():
    torch.manual_seed(3)
    model = build_model(get_config("tiny", **TINY)).eval()
    x = torch.randint(0, 512, (1, 50))
    with torch.no_grad():
        full = model(x).logits
        caches = model.new_caches(1, 50, torch.float32, "cpu")
        a = model(x[:, :40], caches=caches).logits  # 40 > window: the ring keeps the last 16
        b = model(x[:, 40:], caches=caches, start_pos=40).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-4)
