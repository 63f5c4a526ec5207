"""Each kernel table (gptoss.model.kernels) against its reference, forward and backward, one parametrised test
per table: attention against the float64 formula with sinks, windows and stories; experts against each expert
applied row by row; head losses against F.cross_entropy of the full-vocabulary model. Plus what a kernel is
kept for: memory linear in T for the CPU attention kernels, no logits kept by the fused loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptoss.config import get_config
from gptoss.model.kernels.attention import (
    ATTENTION_KERNELS,
    Segments,
    banded_sliding_attention,
    sink_sdpa_attention,
)
from gptoss.model.kernels.experts import EXPERT_KERNELS, grouped_mm_supported
from gptoss.model.kernels.head_loss import IGNORE_INDEX, LOSS_KERNELS, chunked_cross_entropy, fused_linear_cross_entropy
from gptoss.model.moe import MoEFeedForward

EOT = 0
# Per row: tokens before the first EOT (the window starts mid-story), then story lengths (each starts with EOT).
ROWS = [
    (5, [20, 1, 1, 9, 12]),  # mid-story start; a story longer than W; two single-token stories
    (0, [3, 30, 14, 1]),  # EOT at position 0; the longest story; the window ends on an EOT
    (48, []),  # no EOT at all: one story, the plain causal case
    (0, [1] * 6 + [42]),  # single-token stories in a row, then a long one
]


def story_tokens(rows=ROWS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for head, stories in rows:
        row = torch.randint(1, 512, (head,), generator=g).tolist()
        for n in stories:
            row += [EOT] + torch.randint(1, 512, (n - 1,), generator=g).tolist()
        out.append(row)
    return torch.tensor(out)


def story_starts(ids: torch.Tensor) -> torch.Tensor:
    """(B, T): index of the first token of each token's story, by walking the row."""
    starts = []
    for row in ids.tolist():
        s, row_starts = 0, []
        for t, tok in enumerate(row):
            s = t if tok == EOT else s
            row_starts.append(s)
        starts.append(row_starts)
    return torch.tensor(starts)


def reference_attention(q, k, v, sinks, window, ids=None):
    """p_ts = exp(s_ts) / (exp(sink_h) + sum exp(s_ts')) over keys s <= t of t's story (and t - s < W)."""
    B, nh, T, d = q.shape
    k, v = (x.repeat_interleave(nh // x.shape[1], 1) for x in (k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    t_idx, s_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (s_idx <= t_idx).expand(B, T, T)
    if ids is not None:
        start = story_starts(ids)
        ok = ok & (start[:, :, None] == start[:, None, :])
    if window is not None:
        ok = ok & (t_idx - s_idx < window)
    e = torch.where(ok[:, None].to(s.device), s.exp(), s.new_zeros(()))
    return (e / (sinks.view(1, -1, 1, 1).exp() + e.sum(-1, keepdim=True))) @ v


def qkv(B=4, nh=4, nkv=2, T=48, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, nh, T, d), (B, nkv, T, d), (B, nkv, T, d), (nh,)]
    return [torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def assert_same(got, ref, inputs, backward=True, **tol):
    torch.testing.assert_close(got, ref, **tol)
    if backward:
        for a, b in zip(torch.autograd.grad(got.square().sum(), inputs),
                        torch.autograd.grad(ref.square().sum(), inputs)):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("stories", [False, True], ids=["plain", "stories"])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 64])
@pytest.mark.parametrize("nkv", [1, 2])
@pytest.mark.parametrize("name", sorted(ATTENTION_KERNELS))
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_kernel_equals_formula(name, nkv, window, stories):
    """float64 with gradients; FlexAttention (no CPU backward, no float64 need) forward in fp32 on CPU."""
    ids = story_tokens()
    q, k, v, s = qkv(nkv=nkv)
    flex = name == "flex"
    if flex:
        q, k, v, s = (t.detach().float() for t in (q, k, v, s))
    segments = Segments.from_tokens(ids, EOT) if stories else None
    got = ATTENTION_KERNELS[name](q, k, v, s, 1 / math.sqrt(q.shape[-1]), window, segments)
    ref = reference_attention(q.double(), k.double(), v.double(), s.double(), window, ids if stories else None)
    assert_same(got, ref.to(got.dtype), (q, k, v, s), backward=not flex, **(dict(atol=1e-5, rtol=1e-4) if flex else {}))


@pytest.mark.parametrize("kernel", [
    lambda q, k, v, seg: banded_sliding_attention(q, k, v, torch.zeros(2), 0.35, 16, seg),
    lambda q, k, v, seg: sink_sdpa_attention(q, k, v, torch.zeros(2), 0.35, seg),
], ids=["banded", "sdpa"])
@pytest.mark.parametrize("stories", [False, True], ids=["plain", "stories"])
def test_cpu_attention_memory_is_linear_in_length(kernel, stories):
    """What the CPU kernels are kept for (BENCHMARKS 2): doubling T doubles the largest tensor autograd saves;
    with stories the mask stays a band and the packed stories at most double the tokens."""
    sizes, saved = [], []
    for n in (256, 512):
        ids = torch.randint(0, 20, (1, n), generator=torch.Generator().manual_seed(n))  # EOT about every 20
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 8, generator=g, requires_grad=True) for h in (2, 1, 1))
        saved[:] = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            kernel(q, k, v, Segments.from_tokens(ids, EOT) if stories else None).sum().backward()
        sizes.append(max(saved))
    assert sizes[1] <= 2.1 * sizes[0]


@pytest.mark.parametrize("name", sorted(EXPERT_KERNELS))
def test_expert_kernel_equals_each_expert_row_by_row(name):
    """float64 rows grouped by expert, an idle expert among them; outputs and gradients of rows and weights.
    grouped in fp32 (torch._grouped_mm takes no float64): on CPU its fallback, one mm per group
    (tests/unit/test_gpu.py has the CUDA kernel in bf16)."""
    dtype = torch.float32 if name == "grouped" else torch.float64
    torch.manual_seed(0)
    layer = MoEFeedForward(get_config("tiny", vocab_size=512)).to(dtype)
    experts = layer.local_experts
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), layer.router.in_features, dtype=dtype, requires_grad=True)
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts).tolist()
    params = [x, *experts.parameters()]
    got = EXPERT_KERNELS[name](experts, x, counts)
    ref = torch.cat([experts[e](x[i:i + 1]) for i, e in enumerate(expert_of_row)])
    def close(a: torch.Tensor, b: torch.Tensor) -> None:  # fp32: summation order, relative to the largest entry
        tol = dict(atol=1e-5 * b.abs().max().item(), rtol=1e-4) if dtype == torch.float32 else {}
        torch.testing.assert_close(a, b, **tol)

    close(got, ref)

    def grads(out: torch.Tensor) -> list[torch.Tensor]:  # an idle expert: zeros or no gradient at all
        got = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]

    mine = grads(got)
    for a, b in zip(mine, grads(ref)):
        close(a, b)
    idle = {id(p) for p in experts[1].parameters()}
    assert all(bool((g == 0).all()) for g, p in zip(mine, params) if id(p) in idle)  # exactly, not nearly


@pytest.mark.parametrize("capability, dtype, hidden, intermediate, want", [
    ((9, 0), torch.bfloat16, 64, 128, True),  # H100 / H200
    ((9, 0), torch.float32, 64, 128, False),
    ((9, 0), torch.bfloat16, 60, 128, False),  # hidden rows not 16-byte aligned
    ((9, 0), torch.bfloat16, 64, 100, False),  # intermediate rows not 16-byte aligned
    ((10, 0), torch.bfloat16, 64, 128, False),  # Blackwell: wrong weight grads for empty groups (pytorch#172439)
    ((8, 0), torch.bfloat16, 64, 128, False),  # A100: torch's fallback syncs on every call
    ((8, 6), torch.bfloat16, 64, 128, False),  # A40: the same fallback
    ((8, 9), torch.bfloat16, 64, 128, False),  # L40S: the same fallback
    ((12, 0), torch.bfloat16, 64, 128, False),  # consumer Blackwell: the same fallback in torch <= 2.13
    (None, torch.bfloat16, 64, 128, False),  # CPU
])
def test_grouped_mm_only_on_hopper_bf16_aligned(capability, dtype, hidden, intermediate, want):
    assert grouped_mm_supported(capability, dtype, hidden, intermediate) == want


TOKENS, HIDDEN, ROWS_V, TAIL_N = 40, 16, 97, 5  # with the tail: 96 kept rows + 1 row for TAIL_N ids


def loss_inputs(dtype: torch.dtype = torch.float64, tail: bool = False, seed: int = 0):
    """hidden, weight, targets with ignored rows (and, with the tail, targets on the tail row)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    w = torch.randn(ROWS_V, HIDDEN, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, ROWS_V, (TOKENS,), generator=g)
    t[::6] = IGNORE_INDEX
    if tail:
        t[1::4] = ROWS_V - 1
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), t


def full_vocab_loss(h, w, t, tail: bool):
    """F.cross_entropy over all logits; with the tail, of the full-vocabulary model itself: TAIL_N equal rows (the
    tail row, expanded: their gradients sum into it) and each tail target one of those ids."""
    if not tail:
        return F.cross_entropy(F.linear(h, w), t, ignore_index=IGNORE_INDEX)
    full_w = torch.cat([w[:-1], w[-1:].expand(TAIL_N, -1)])
    full_t = torch.where(t == ROWS_V - 1, ROWS_V - 1 + torch.arange(TOKENS) % TAIL_N, t)
    return F.cross_entropy(F.linear(h, full_w), full_t, ignore_index=IGNORE_INDEX)


def loss_and_grads(fn, h, w, t, scale: float = 0.25):
    """The loss and d(scale x loss)/d(hidden, weight): DeepSpeed's 1/accumulation scaling makes grad_output != 1."""
    loss = fn(h, w, t)
    return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(loss * scale, (h, w))]


@pytest.mark.parametrize("tail", [False, True], ids=["full", "tail"])
@pytest.mark.parametrize("chunk", [7, 16, TOKENS, None])  # 7 and 16 do not divide 40; None: the default
@pytest.mark.parametrize("name", sorted(LOSS_KERNELS))
def test_loss_kernel_equals_full_vocab_cross_entropy(name, chunk, tail):
    """float64, with ignored targets and the data vocabulary's tail."""
    h, w, t = loss_inputs(tail=tail)
    lt = math.log(TAIL_N) if tail else None
    got = loss_and_grads(lambda *a: LOSS_KERNELS[name](*a, chunk, lt), h, w, t)
    ref = loss_and_grads(lambda *a: full_vocab_loss(*a, tail), h, w, t)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert got[1].abs().max() > 1e-3 and got[2].abs().max() > 1e-3  # gradients that say something


def test_fused_loss_saves_no_logits_for_backward():
    """What the fused kernel is kept for (BENCHMARKS 11): only grad_hidden, grad_weight and the count survive."""
    h, w, t = loss_inputs(torch.float32, tail=True)
    shapes: list[tuple[int, ...]] = []

    def saved(fn) -> list[tuple[int, ...]]:
        shapes.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
            fn()
        return list(shapes)

    fused = saved(lambda: fused_linear_cross_entropy(h, w, t, chunk_tokens=16, log_tail_size=1.0))
    assert sorted(fused) == sorted([(), (ROWS_V, HIDDEN), (TOKENS, HIDDEN)])
    # the hook does see logits where they are kept: the chunked loss in one chunk saves [tokens x vocab]
    assert any(math.prod(s) >= TOKENS * ROWS_V for s in saved(lambda: chunked_cross_entropy(h, w, t)))
