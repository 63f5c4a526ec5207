"""Our GPT-OSS against transformers' GptOssForCausalLM (eager attention, fp32): same weights, same logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptoss.config import get_config
from gptoss.hf import from_hf_config, from_hf_state_dict, hf_config, to_hf_state_dict
from gptoss.model import ModelOptions, build_model

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False}


def tiny(rope_scaling=None):
    max_pos = 131072 if rope_scaling else 256  # YaRN: factor * original context
    return get_config("tiny", vocab_size=512, rope_scaling=rope_scaling, max_position_embeddings=max_pos)


def build_ours(cfg, seed, attention="auto"):
    torch.manual_seed(seed)
    model = build_model(cfg, options=ModelOptions(attention=attention)).eval()
    with torch.no_grad():  # non-trivial biases and sinks, so a mapping mistake cannot hide behind zeros
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0, 0.5)
    return model


def build_hf(cfg):
    hc = transformers.GptOssConfig(**hf_config(cfg))
    return transformers.GptOssForCausalLM._from_config(hc, attn_implementation="eager").eval()


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_match_transformers(rope_scaling, seed):
    cfg = tiny(rope_scaling)
    ours, ours_eager = build_ours(cfg, seed), build_ours(cfg, seed, "eager")
    hf = build_hf(cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.sliding_window + 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(x).logits
        fast = ours(x).logits
        eager = ours_eager(x).logits
    assert (fast - expected).abs().max().item() < 1e-4
    assert (eager - expected).abs().max().item() < 1e-4


def test_load_hf_weights_into_ours():
    cfg = tiny(YARN)
    hf = build_hf(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    x = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() < 1e-4
    assert from_hf_config(hf_config(cfg)) == cfg
    odd = dataclasses.replace(cfg, swiglu_alpha=1.5, swiglu_limit=5.0, initializer_range=0.01)
    assert from_hf_config(hf_config(odd)) == odd


def test_loss_matches_transformers():
    cfg = tiny()
    ours = build_ours(cfg, 0)
    hf = build_hf(cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        ours_loss = ours(x[:, :-1], targets=x[:, 1:]).loss
        hf_loss = hf(x, labels=x).loss  # HF shifts labels inside
    assert abs(ours_loss.item() - hf_loss.item()) < 1e-5


def test_gpt2_baseline_matches_transformers_gpt2():
    cfg = get_config("gpt2-tiny", vocab_size=512)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases too, so a dropped mapping cannot hide behind default init
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hc = transformers.GPT2Config(**hf_config(cfg))
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() < 1e-4
