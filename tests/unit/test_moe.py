"""The MoE layer: router (top-k then softmax), dispatch against the dense per-token sum, the load-balancing
loss and the statistics each call returns; the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss.config import get_config
from gptoss.model import ModelOptions, build_model, param_groups
from gptoss.model.moe import (
    EXPERT_KEY,
    MoEFeedForward,
    deepspeed_moe_class,
    expert_counts,
    expert_key,
    load_balancing_loss,
)

TINY = dict(vocab_size=512)


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


def test_param_groups_no_decay_on_norms_biases_sinks_embeddings():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", **TINY), options=ModelOptions(deepspeed_engine=True))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1)
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.dim() < 2 or n.startswith("embed_tokens")
            assert (g["weight_decay"] == 0.0) == no_decay, n
    assert any(g.get("moe") for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_expert_counts_equal_bincount():
    idx = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_counts(idx, 8), torch.bincount(idx, minlength=8))


def test_expert_key_is_the_state_dict_key():
    """The one spelling of an expert parameter's key (hf.py and checkpoint/read.py import it) matches the model."""
    keys = [k for k in build_model(get_config("tiny", **TINY), device="meta").state_dict() if EXPERT_KEY.match(k)]
    assert expert_key(1, 3, "down_proj") in keys and len(keys) == 2 * 4 * 4
    assert EXPERT_KEY.match(expert_key(12, 31, "gate_up_proj_bias")).groups() == ("12", "31", "gate_up_proj_bias")


def test_deepspeed_moe_only_for_a_model_an_engine_wraps():
    """Plain torch layers unless ModelOptions(deepspeed_engine=True); both the same parameters and computation,
    and only the latter are DeepSpeed's MoE with expert parameters marked for the expert-data-parallel group."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    cfg = get_config("tiny", **TINY)
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    engine_side = build_model(cfg, options=ModelOptions(deepspeed_engine=True))
    assert not any(isinstance(m, MoE) for m in plain.modules())
    assert [type(b.mlp) for b in engine_side.layers] == [deepspeed_moe_class()] * 2
    assert all(isinstance(b.mlp, MoE) and b.mlp.expert_group_name == "ep_size_1" for b in engine_side.layers)
    a, b = plain.state_dict(), engine_side.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {n for n, p in engine_side.named_parameters() if is_moe_param(p)} == {k for k in b if EXPERT_KEY.match(k)}
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(plain(x).logits, engine_side(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="deepspeed_engine=True"):
        param_groups(plain, 0.1)
