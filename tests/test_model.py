"""The model's pieces against their formulas (float64 where it matters), and the kernels against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptoss.config import ConfigError, ModelConfig, flops_per_token, get_config, param_counts
from gptoss.model import build_model, param_groups, set_attention_impl
from gptoss.model.attention import (
    banded_sliding_attention,
    eager_attention,
    flex_attention_with_sinks,
    sink_sdpa_attention,
)
from gptoss.model.layers import RMSNorm, apply_rotary, clamped_swiglu, yarn_inv_freq
from gptoss.model.loss import chunked_cross_entropy
from gptoss.model.moe import MoEFeedForward, load_balancing_loss

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


def grads(out, *inputs):
    return torch.autograd.grad(out.square().sum(), inputs)


@pytest.mark.parametrize("window", [None, 1, 5, 16, 64])
def test_eager_attention_matches_formula(window):
    q, k, v, s = qkv()
    pos = torch.arange(q.shape[2])
    got = eager_attention(q, k, v, s, 1 / math.sqrt(q.shape[-1]), window, pos, pos)
    torch.testing.assert_close(got, naive_attention(q, k, v, s, window))


@pytest.mark.parametrize("T,window", [(37, 5), (64, 16), (16, 16), (7, 16), (100, 1)])
def test_banded_equals_eager_forward_and_backward(T, window):
    q, k, v, s = qkv(T=T)
    scale = 1 / math.sqrt(q.shape[-1])
    pos = torch.arange(T)
    ref = eager_attention(q, k, v, s, scale, window, pos, pos)
    got = banded_sliding_attention(q, k, v, s, scale, window)
    torch.testing.assert_close(got, ref)
    for a, b in zip(grads(got, q, k, v, s), grads(ref, q, k, v, s)):
        torch.testing.assert_close(a, b)


def test_sink_sdpa_equals_eager_forward_and_backward():
    q, k, v, s = qkv(T=45)
    scale = 1 / math.sqrt(q.shape[-1])
    pos = torch.arange(45)
    ref = eager_attention(q, k, v, s, scale, None, pos, pos)
    got = sink_sdpa_attention(q, k, v, s, scale)
    torch.testing.assert_close(got, ref)
    for a, b in zip(grads(got, q, k, v, s), grads(ref, q, k, v, s)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_equals_eager(window):
    """FlexAttention has no CPU backward; its forward (with the LSE sink correction) is checked here."""
    q, k, v, s = (t.detach().float() for t in qkv(T=128, d=16))
    scale = 1 / math.sqrt(16)
    pos = torch.arange(128)
    with torch.no_grad():
        ref = eager_attention(q, k, v, s, scale, window, pos, pos)
        got = flex_attention_with_sinks(q, k, v, s, scale, window)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_sliding_layer_memory_is_linear_in_length():
    """The banded kernel's largest intermediate is (T/W) * W * 2W: doubling T doubles it, not quadruples."""
    sizes = []
    for T in (256, 512):
        q, k, v, s = (t.detach().float() for t in qkv(B=1, nh=2, nkv=1, T=T, d=8))
        peak = 0

        def hook(t):
            nonlocal peak
            peak = max(peak, t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
            banded_sliding_attention(q.requires_grad_(), k, v, s, 0.35, 16).sum().backward()
        sizes.append(peak)
    assert sizes[1] <= 2.1 * sizes[0]


def test_rmsnorm_is_fp32_and_matches_formula():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    norm = RMSNorm(8)
    norm.weight.data.uniform_(0.5, 1.5)
    t = x.double()
    ref = (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16 and norm.weight.dtype == torch.float32
    torch.testing.assert_close(norm(x), ref)


def test_rope_half_split_and_yarn_constants():
    inv, conc = yarn_inv_freq(64, 150000.0, None)
    torch.testing.assert_close(inv, 1 / 150000.0 ** (torch.arange(0, 64, 2) / 64))
    assert conc == 1.0
    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096}
    inv_y, conc_y = yarn_inv_freq(64, 150000.0, yarn)
    assert conc_y == pytest.approx(0.1 * math.log(32) + 1)
    # Below low (8.09) frequencies are kept, above high (17.40) divided by the factor.
    torch.testing.assert_close(inv_y[:9], inv[:9])
    torch.testing.assert_close(inv_y[18:], inv[18:] / 32)
    x = torch.randn(1, 1, 1, 4)
    cos, sin = torch.tensor([[0.0, 1.0]]).cos(), torch.tensor([[0.0, 1.0]]).sin()
    out = apply_rotary(x, cos, sin)[0, 0, 0]
    x1, x2 = x[0, 0, 0, :2], x[0, 0, 0, 2:]
    torch.testing.assert_close(out, torch.cat([x1 * cos[0] - x2 * sin[0], x2 * cos[0] + x1 * sin[0]]))


def test_clamped_swiglu_interleaved():
    h = torch.tensor([[10.0, -9.0, 1.0, 2.0]])  # gate, up, gate, up
    got = clamped_swiglu(h, alpha=1.702, limit=7.0)
    gate = torch.tensor([7.0, 1.0])
    up = torch.tensor([-7.0, 2.0])
    torch.testing.assert_close(got[0], gate * torch.sigmoid(1.702 * gate) * (up + 1))


def test_router_topk_then_softmax_and_counts():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", **TINY))
    moe = model.layers[0].mlp
    x = torch.randn(5, moe.router.in_features)
    logits, idx, w = moe.route(x)
    top = logits.topk(2, dim=-1)
    torch.testing.assert_close(idx, top.indices)
    torch.testing.assert_close(w, torch.softmax(top.values, -1))


def test_moe_layer_matches_dense_reference():
    """Dispatch (sort, split, combine) equals the per-token sum of w_k * expert_k(x)."""
    torch.manual_seed(0)
    moe = build_model(get_config("tiny", **TINY)).layers[1].mlp
    x = torch.randn(2, 9, moe.router.in_features)
    got = moe(x).hidden
    flat = x.reshape(-1, x.shape[-1])
    _, idx, w = moe.route(flat)
    ref = torch.stack([
        sum(w[t, j] * moe.local_experts[int(idx[t, j])](flat[t:t + 1])[0] for j in range(2))
        for t in range(flat.shape[0])])
    torch.testing.assert_close(got.reshape(-1, x.shape[-1]), ref)


def test_load_balancing_loss_hand_checked():
    # 4 tokens, 2 experts; uniform router probabilities; token assignments 3 vs 1 (top-1).
    logits = torch.zeros(4, 2)
    counts = torch.tensor([3, 1])
    # E * sum_e f_e * P_e = 2 * (3/4 * 1/2 + 1/4 * 1/2) = 1
    assert load_balancing_loss(logits, counts).item() == pytest.approx(1.0)
    logits = torch.tensor([[2.0, 0.0]] * 4)
    p0 = math.exp(2) / (math.exp(2) + 1)
    assert load_balancing_loss(logits, torch.tensor([4, 0])).item() == pytest.approx(2 * p0)


def test_router_statistics_on_a_hand_routed_batch():
    """Router weight only on hidden dim 0: tokens with x0 = +1 pick experts (0, 2), x0 = -1 pick (1, 3)."""
    layer = MoEFeedForward(get_config("tiny", **TINY)).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([2.0, -2.0, 1.0, -1.0])
        layer.router.bias.zero_()
        for p in layer.local_experts.parameters():
            p.normal_(0, 0.1)
    x = torch.zeros(4, layer.router.in_features)
    x[:, 0] = torch.tensor([1.0, 1.0, -1.0, 1.0])
    x[:, 1:] = torch.randn(4, x.shape[1] - 1)
    with torch.no_grad():
        y, aux_loss, counts = layer(x)
    assert counts.tolist() == [3, 1, 3, 1]
    # aux = E * sum_e f_e * P_e with f = counts / N and P the mean router softmax over all E experts
    z = math.exp(2) + math.exp(-2) + math.exp(1) + math.exp(-1)
    p_plus = [math.exp(v) / z for v in (2, -2, 1, -1)]
    p_minus = p_plus[1::-1] + p_plus[3:1:-1]  # the same logits negated
    mean_p = [(3 * a + b) / 4 for a, b in zip(p_plus, p_minus)]
    f = [0.75, 0.25, 0.75, 0.25]
    assert aux_loss.item() == pytest.approx(4 * sum(fe * pe for fe, pe in zip(f, mean_p)))
    # output: softmax over the two chosen logits (2 and 1) weights the two experts
    w_hi, w_lo = math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))
    e = layer.local_experts
    with torch.no_grad():
        assert torch.allclose(y[0], w_hi * e[0](x[:1])[0] + w_lo * e[2](x[:1])[0], atol=1e-6)
        assert torch.allclose(y[2], w_hi * e[1](x[2:3])[0] + w_lo * e[3](x[2:3])[0], atol=1e-6)


def test_expert_counts_reported():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", **TINY))
    x = torch.randint(0, 512, (2, 20))
    out = model(x, targets=x)
    assert out.expert_counts.shape == (2, 4)
    assert out.expert_counts.sum(1).tolist() == [2 * 20 * 2] * 2  # tokens x top-k per layer
    assert out.aux_loss.item() > 0


def test_each_forward_returns_its_own_router_statistics():
    """Aux loss and counts come back from each call (nothing kept on the module from an earlier one)."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny", **TINY))
    moe = model.layers[0].mlp
    h = moe.router.in_features
    first = moe(torch.randn(3, h))
    second = moe(torch.randn(2, 5, h))
    assert isinstance(first, tuple) and len(first) == 3  # DeepSpeed's (output, l_aux, exp_counts)
    assert first.counts.sum().item() == 3 * 2 and second.counts.sum().item() == 10 * 2
    assert second.hidden.shape == (2, 5, h) and second.counts.shape == (4,) and second.aux_loss.shape == ()
    assert not any(name.startswith("last_") for name in vars(moe))

    per_layer = []
    hooks = [b.mlp.register_forward_hook(lambda mod, args, out: per_layer.append(out)) for b in model.layers]
    x1, x2 = torch.randint(0, 512, (2, 20)), torch.randint(0, 512, (1, 7))
    out1 = model(x1, targets=x1)
    layers1, per_layer[:] = list(per_layer), []
    out2 = model(x2)
    for hook in hooks:
        hook.remove()
    for out, layers, tokens in ((out1, layers1, 40), (out2, per_layer, 7)):
        assert out.expert_counts.dtype == torch.int64 and out.expert_counts.shape == (2, 4)
        assert out.expert_counts.sum(1).tolist() == [tokens * 2] * 2
        torch.testing.assert_close(out.expert_counts, torch.stack([o.counts for o in layers]))
        coef = model.config.router_aux_loss_coef
        torch.testing.assert_close(out.aux_loss, torch.stack([o.aux_loss for o in layers]).mean() * coef)
    again = model(x1, targets=x1)
    assert torch.equal(again.expert_counts, out1.expert_counts) and torch.equal(again.aux_loss, out1.aux_loss)


def test_forward_traces_under_torch_compile():
    """Dynamo traces the forward (graph breaks allowed) and gives the eager loss, aux loss and counts.
    The `eager` backend keeps this cheap on CPU; inductor would compile for ~40 s."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny", **TINY))
    x = torch.randint(0, 512, (2, 20))
    ref = model(x, targets=x)
    got = torch.compile(model, fullgraph=False, backend="eager")(x, targets=x)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.aux_loss, ref.aux_loss)
    assert torch.equal(got.expert_counts, ref.expert_counts)
    (got.loss + got.aux_loss).backward()
    assert model.layers[0].mlp.router.weight.grad is not None


def test_chunked_cross_entropy_equals_plain():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=g)
    ref = F.cross_entropy(h @ w.t(), t)
    ref_grads = torch.autograd.grad(ref, (h, w), retain_graph=True)
    for chunk_tokens in (7, 50, None):  # checkpointed chunks; one chunk exactly; the default (one, unchecked)
        got = chunked_cross_entropy(h, w, t, chunk_tokens=chunk_tokens)
        torch.testing.assert_close(got.double(), ref)
        for a, b in zip(torch.autograd.grad(got, (h, w)), ref_grads):
            torch.testing.assert_close(a, b)


def test_full_model_fast_path_equals_eager_path():
    torch.manual_seed(1)
    cfg = get_config("tiny", **TINY)
    model = build_model(cfg).double()
    x = torch.randint(0, 512, (2, 40))  # longer than the window (16)
    fast = model(x, targets=x)
    g_fast = torch.autograd.grad(fast.loss, list(model.parameters()))
    set_attention_impl(model, "eager")
    slow = model(x, targets=x)
    g_slow = torch.autograd.grad(slow.loss, list(model.parameters()))
    torch.testing.assert_close(fast.loss, slow.loss)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


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


def test_param_counts_reproduce_released_models():
    p20 = param_counts(get_config("gpt-oss-20b"))
    assert round(p20["total"] / 1e9, 3) == 20.915
    assert round(p20["active_excl_unembedding"] / 1e9, 3) == 3.608
    p120 = param_counts(get_config("gpt-oss-120b"))
    assert round(p120["total"] / 1e9, 3) == 116.829
    assert round(p120["active_excl_unembedding"] / 1e9, 3) == 5.133


@pytest.mark.parametrize("preset", ["tiny", "nano", "gpt2-nano", "gpt-oss-20b", "gpt-oss-120b"])
def test_param_counts_equal_built_model(preset):
    cfg = get_config(preset)
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]


def test_flops_per_token_counts_window():
    cfg = get_config("nano")
    p = param_counts(cfg)
    f = flops_per_token(cfg, 4096, training=False)
    dense_part = 2 * (p["active"] - p["embedding"] - p["norms"])
    attn_full = 4 * (4097 / 2) * cfg.q_dim
    w = 128
    attn_sliding = 4 * ((w * (w + 1) / 2 + (4096 - w) * w) / 4096) * cfg.q_dim
    assert f == pytest.approx(dense_part + 4 * attn_full + 4 * attn_sliding)
    assert flops_per_token(cfg, 4096) == pytest.approx(3 * f)


@pytest.mark.parametrize("overrides,key", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(arch="llama"), "arch"),
])
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        get_config("nano", **overrides)


def test_config_json_round_trip(tmp_path):
    cfg = get_config("gpt-oss-20b")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"hidden_size": 8, "n_embd": 4}')
    with pytest.raises(ConfigError, match="n_embd"):
        ModelConfig.load(tmp_path / "bad.json")


def test_param_groups_no_decay_on_norms_biases_sinks_embeddings():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", **TINY))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1)
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.dim() < 2 or n.startswith("embed_tokens")
            assert (g["weight_decay"] == 0.0) == no_decay, n
    assert any(g.get("moe") for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, flex, cpu, eager"):
        set_attention_impl(build_model(get_config("tiny", **TINY)), "fast")


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_head_is_initialised_like_its_matrices(tied):
    """GPT-2's scheme: normal(0, 0.02); an untied lm_head gets it too (torch's default would be uniform, std
    1/sqrt(3 * hidden): 0.072 at hidden 64)."""
    torch.manual_seed(0)
    cfg = get_config("gpt2-nano", vocab_size=2048, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=16, tie_word_embeddings=tied)
    model = build_model(cfg)
    head = model.lm_head.weight
    assert (head is model.wte.weight) == tied
    assert head.std().item() == pytest.approx(cfg.initializer_range, rel=0.02)
    assert head.mean().abs().item() < 1e-3


@pytest.mark.parametrize("ours, baseline", [("tiny", "gpt2-tiny"), ("mini", "gpt2-mini"),
                                            ("mini-320", "gpt2-mini-320")])
def test_comparison_pairs_match_in_active_non_embedding_parameters(ours, baseline):
    """BENCHMARKS 9 and 10 compare these pairs at equal compute in the blocks: same depth and width, non-embedding
    active parameters within 25% (tiny) and 1% (the mini pairs, which carry the comparison's claim)."""
    a, b = get_config(ours), get_config(baseline)
    assert (a.arch, b.arch) == ("gpt_oss", "gpt2")
    assert (a.num_hidden_layers, a.hidden_size) == (b.num_hidden_layers, b.hidden_size)
    pa, pb = param_counts(a)["non_embedding_active"], param_counts(b)["non_embedding_active"]
    assert pa / pb == pytest.approx(1.0, rel=0.25 if ours == "tiny" else 0.01), (pa, pb)
