"""Small building blocks of GPT-OSS: RMSNorm, rotary embedding with YaRN, clamped SwiGLU.

Each is checked against `shared/spec/gpt-oss-architecture.md` (and the reference `gpt_oss/torch/model.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype; the scale stays fp32 (as the reference)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one op: torch.rms_norm runs the same ops in this order
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        return (t * self.weight.float()).to(x.dtype)


def yarn_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention "concentration" (cos/sin multiplier) of YaRN.

    With no scaling (or factor <= 1) this is plain RoPE with concentration 1. Formula: reference
    `RotaryEmbedding._compute_concentration_and_inv_freq`. HF's yarn (truncate=False) is equal as long
    as 0 <= low and high <= d/2 - 1 (HF clamps there); every released config is inside that range.
    """
    freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor = float(rope_scaling.get("factor", 1.0)) if rope_scaling else 1.0
    if factor <= 1.0:
        return (1.0 / freq).float(), 1.0
    assert rope_scaling is not None
    L0 = float(rope_scaling.get("original_max_position_embeddings", 4096))
    beta_fast = float(rope_scaling.get("beta_fast", 32.0))
    beta_slow = float(rope_scaling.get("beta_slow", 1.0))
    d_half = head_dim / 2
    low = d_half * math.log(L0 / (beta_fast * 2 * math.pi)) / math.log(theta)
    high = d_half * math.log(L0 / (beta_slow * 2 * math.pi)) / math.log(theta)
    ramp = ((torch.arange(d_half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = ramp / (factor * freq) + (1 - ramp) / freq  # interpolate low frequencies, keep high ones
    concentration = 0.1 * math.log(factor) + 1.0
    return inv_freq.float(), concentration


class RotaryEmbedding(nn.Module):
    """Half-split (NeoX style) rotary embedding: cos/sin computed from the positions in each forward.

    No table cached on the module and no `.item()` to size one: the forward has no host sync and no state, so
    torch.compile traces it whole; the cost is one (positions x head_dim/2) cos and sin per forward (shared by
    every layer), the same values as the table's rows (fp32 position times fp32 inverse frequency).
    """

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        # A plain attribute, not a buffer: `module.to(bfloat16)` (DeepSpeed's bf16) must not round it.
        self.inv_freq, self.concentration = yarn_inv_freq(head_dim, theta, rope_scaling)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (fp32) of shape positions.shape + (head_dim/2,): positions (T,) shared by the batch, or
        (B, T) per row (story-aware attention restarts them at each story)."""
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        return freqs.cos() * self.concentration, freqs.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, d) by cos/sin (T, d/2) or per row (B, T, d/2): half-split, not interleaved."""
    cos = cos.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def clamped_swiglu(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """GPT-OSS SwiGLU on the fused projection h (..., 2I) whose gate and up columns are INTERLEAVED."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)

