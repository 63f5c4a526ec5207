"""The whole models built once from their options: the CPU kernels equal the eager reference (loss and every
gradient), the forward traces under torch.compile, unknown options are refused, GPT-2's head init."""

from __future__ import annotations

import pytest
import torch

from gptoss.config import get_config
from gptoss.model import ModelOptions, build_model

TINY = dict(vocab_size=512)


def test_full_model_cpu_kernels_equal_eager_kernel():
    cfg = get_config("tiny", **TINY)
    x = torch.randint(0, 512, (2, 40))  # longer than the window (16)
    results = []
    for attention in ("cpu", "eager"):
        torch.manual_seed(1)
        model = build_model(cfg, options=ModelOptions(attention=attention)).double()
        out = model(x, targets=x)
        results.append([out.loss, *torch.autograd.grad(out.loss, list(model.parameters()))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


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


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="expected one of auto, flex, cpu, eager"):
        ModelOptions(attention="fast")
    with pytest.raises(ValueError, match="expected one of auto, chunked, fused"):
        ModelOptions(loss="fast")


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
