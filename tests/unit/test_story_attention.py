"""Story-aware attention: no query sees across <|endoftext|>, rotary positions restart at each story.

`Segments` against the per-token definition (a loop finds each token's story start), its SDPA packing, and the
whole models against themselves run on each story alone. Each kernel with stories against the float64 formula
is in tests/unit/test_kernels.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels import EOT, ROWS, assert_same, qkv, story_starts, story_tokens
from test_kernels import reference_attention as reference

from gptoss.config import get_config
from gptoss.model import ModelOptions, Segments, build_model
from gptoss.model.kernels.attention import flex_attention_with_sinks, per_story_attention, sink_sdpa_attention

VOCAB = 512
T, N_ROWS = 48, len(ROWS)


def test_segments_follow_the_definition():
    ids = story_tokens()
    seg = Segments.from_tokens(ids, EOT)
    start = story_starts(ids)
    assert torch.equal(seg.positions, torch.arange(T) - start)
    same = seg.doc_ids[:, :, None] == seg.doc_ids[:, None, :]
    assert torch.equal(same, start[:, :, None] == start[:, None, :])
    assert seg.positions[1].tolist()[:6] == [0, 1, 2, 0, 1, 2]  # EOT is position 0 of the story it starts
    assert seg.positions[3].tolist()[:7] == [0] * 7 and seg.positions[3, -1] == 41


def test_packing_is_linear_and_covers_every_token_once():
    seg = Segments.from_tokens(story_tokens(), EOT)
    pack = seg.packing()
    assert len(pack.buckets) <= math.log2(T) + 2  # one SDPA call per power-of-two length
    assert sum(index.numel() for index, _ in pack.buckets) <= 2 * seg.positions.numel()
    real = torch.cat([index[valid] for index, valid in pack.buckets])
    assert torch.equal(real.sort().values, torch.arange(seg.positions.numel()))


def test_per_story_attention_equals_one_call_per_story():
    ids, (q, k, v, s) = story_tokens(seed=3), qkv(seed=3)
    got = per_story_attention(lambda *t: sink_sdpa_attention(*t, s, 0.3), q, k, v, Segments.from_tokens(ids, EOT))
    starts = story_starts(ids)
    for b in range(ids.shape[0]):
        for a in starts[b].unique().tolist():
            e = a + int((starts[b] == a).sum())
            alone = sink_sdpa_attention(q[b:b + 1, :, a:e], k[b:b + 1, :, a:e], v[b:b + 1, :, a:e], s, 0.3)
            torch.testing.assert_close(got[b:b + 1, :, a:e], alone)


def flex_case(seed: int = 0):
    """Two 256-token rows (two FlexAttention blocks), stories longer and shorter than a block."""
    ids = story_tokens([(5, [200, 1, 1, 49]), (0, [1, 130, 100, 25])], seed)
    q, k, v, s = (t.detach().float() for t in qkv(B=2, nh=4, nkv=2, T=256, d=16, seed=seed))
    return ids, q, k, v, s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("window", [None, 16])
def test_flex_backward_with_stories_on_gpu(window):
    ids, *tensors = flex_case()
    q, k, v, s = (t.cuda().requires_grad_() for t in tensors)
    got = flex_attention_with_sinks(q, k, v, s, 0.25, window, Segments.from_tokens(ids.cuda(), EOT))
    ref = reference(*(t.double() for t in (q, k, v, s)), window, ids).float()
    assert_same(got, ref, (q, k, v, s), atol=2e-4, rtol=1e-3)


def dense_story_mask(ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) from the per-token definition: causal, inside the window, the same story."""
    start = story_starts(ids)
    i, j = torch.arange(ids.shape[1])[:, None], torch.arange(ids.shape[1])[None, :]
    ok = (j <= i) & ((i - j < window) if window is not None else True)
    return (ok & (start[:, :, None] == start[:, None, :]))[:, None]


def block_mask_tensors(mask) -> list[torch.Tensor]:  # noqa: ANN001 (BlockMask)
    return [t for t in mask.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("window", [None, 16])
def test_story_block_masks_follow_the_definition(window, compiled):
    """The FlexAttention story mask, created eagerly (CPU) or through torch.compile (the CUDA default, here on
    CPU with inductor): its mask function is the dense definition, and its block tables are those of eager
    creation (blocks partly and wholly inside, in the same order)."""
    from torch.nn.attention.flex_attention import create_mask

    from gptoss.model.kernels.attention import _flex_mask

    ids = flex_case()[0]
    eager = Segments.from_tokens(ids, EOT).block_mask(window)
    mask = _flex_mask(window, ids.shape[1], ids.device, Segments.from_tokens(ids, EOT).doc_ids, compiled=compiled)
    B, T = ids.shape
    assert torch.equal(create_mask(mask.mask_mod, B, 1, T, T), dense_story_mask(ids, window))
    for a, b in zip(block_mask_tensors(mask), block_mask_tensors(eager), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl,built", [("flex", {16, None}), ("cpu", "packing"), ("eager", None)])
def test_segments_are_prepared_once_before_the_first_layer(impl, built):
    """Every layer of a forward gets the same Segments, already holding what its kernel reads (both block masks
    for flex, the SDPA packing for cpu, nothing for eager): nothing is built inside a (compiled) block."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny", vocab_size=VOCAB, num_hidden_layers=4),
                        options=ModelOptions(attention=impl)).eval()
    seen = []
    hooks = [block.self_attn.register_forward_pre_hook(
        lambda mod, args: seen.append((args[5], set(args[5]._block_masks), args[5]._packing is not None)))
        for block in model.layers]
    with torch.no_grad():
        model(story_tokens(seed=1), eot_id=EOT)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4 and all(s[0] is seen[0][0] for s in seen)
    for _, masks, packed in seen:
        assert masks == (built if isinstance(built, set) else set())
        assert packed == (built == "packing")


def model_and_ids(preset: str, impl: str = "cpu"):
    torch.manual_seed(0)
    model = build_model(get_config(preset, vocab_size=VOCAB), options=ModelOptions(attention=impl)).eval()
    return model, story_tokens(seed=1)


@pytest.mark.parametrize("preset,impl", [("tiny", "cpu"), ("tiny", "eager"), ("gpt2-tiny", "cpu")])
def test_model_with_stories_equals_each_story_alone(preset, impl):
    """The strongest check: each story's logits in the packed window are those of the story run alone
    (positions from 0, plain causal attention). tiny's window is 16: one story is longer."""
    model, ids = model_and_ids(preset, impl)
    with torch.no_grad():
        packed = model(ids, eot_id=EOT).logits
        starts = story_starts(ids)
        for b in range(ids.shape[0]):
            for a in starts[b].unique().tolist():
                e = a + int((starts[b] == a).sum())
                alone = model(ids[b:b + 1, a:e]).logits
                torch.testing.assert_close(packed[b:b + 1, a:e], alone, atol=1e-5, rtol=1e-5)
        plain = model(ids).logits
    assert not torch.allclose(packed, plain, atol=1e-3)  # without eot_id the stories see each other


def test_rotary_positions_restart_at_each_story():
    """RoPE scores are relative, so the check above cannot see the offsets: look at the angles themselves."""
    model, ids = model_and_ids("tiny")
    seen = []
    hook = model.layers[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1:4]))
    with torch.no_grad():
        model(ids, eot_id=EOT)
    hook.remove()
    cos, sin, positions = seen[0]
    want = torch.arange(T) - story_starts(ids)
    assert torch.equal(positions, want)
    ref_cos, ref_sin = model.rotary(want)
    assert cos.shape == (N_ROWS, T, 8) and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_flex_forward_with_stories_equals_cpu_kernels():
    (flex_model, ids), (cpu_model, _) = model_and_ids("tiny", "flex"), model_and_ids("tiny", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(flex_model(ids, eot_id=EOT).logits, cpu_model(ids, eot_id=EOT).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "gpt2-tiny"])
def test_without_eot_id_nothing_changes(preset):
    """eot_id=None is one causal sequence per row (decoding, and callers that pass no eot_id); a window
    with no EOT in it gives the same logits through the story kernels."""
    model, ids = model_and_ids(preset)
    no_eot = ids.clamp(min=1)
    with torch.no_grad():
        plain = model(no_eot).logits
        assert torch.equal(model(no_eot, eot_id=None).logits, plain)
        torch.testing.assert_close(model(no_eot, eot_id=EOT).logits, plain, atol=1e-6, rtol=1e-6)


def test_loss_with_stories_agrees_between_cpu_and_eager_kernels():
    results = []
    for impl in ("cpu", "eager"):
        model, ids = model_and_ids("tiny", impl)
        out = model.train()(ids, targets=ids.roll(-1, dims=1), eot_id=EOT)
        assert torch.isfinite(out.loss)
        results.append((out.loss, torch.autograd.grad(out.loss, list(model.parameters()))))
    (cpu_loss, cpu_grads), (eager_loss, eager_grads) = results
    torch.testing.assert_close(cpu_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(cpu_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_eot_id_refuses_caches():
    model, ids = model_and_ids("tiny")
    caches = model.new_caches(1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="eot_id"):
        model(ids[:1, :4], caches=caches, eot_id=EOT)
