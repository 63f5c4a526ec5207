"""RMSNorm, rotary with YaRN and the clamped SwiGLU against the spec's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss.model.layers import RMSNorm, apply_rotary, clamped_swiglu, yarn_inv_freq


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
