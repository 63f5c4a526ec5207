"""Grouped-query attention with learned sinks, sliding-window or full causal.

Three exact kernels compute the same function (`p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik))`):
- `eager_attention`: the reference (explicit positions, any mask); used by tests and the KV-cache path.
- CPU training: `banded_sliding_attention` touches only the window band (memory O(T*W)), and
  `sink_sdpa_attention` folds the sink into PyTorch SDPA as one extra key (full layers).
- GPU training: `flex_attention_with_sinks`, FlexAttention with a block mask and the log-sum-exp
  correction `out * sigmoid(lse - sink)` (FlexAttention has no CPU backward).
Shapes: q (B, n_heads, T, d); k, v (B, n_kv, T, d); query head h reads kv head h // (n_heads / n_kv).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from gptoss.model.layers import apply_rotary


def _softmax_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax in at least fp32 (bf16 scores would lose the small probabilities)."""
    return torch.softmax(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                    window: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Reference attention. q_pos (Tq,), k_pos (Tk,) are absolute positions; k_pos < 0 marks empty slots."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # HF repeat_kv order
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, Tq, Tk)
    rel = q_pos[:, None] - k_pos[None, :]
    allowed = (k_pos[None, :] >= 0) & (rel >= 0)
    if window is not None:
        allowed &= rel < window  # W keys including itself
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
    probs = _softmax_fp32(torch.cat([scores, sink], dim=-1))[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


@functools.lru_cache(maxsize=16)
def _band_mask(n_blocks: int, window: int, device: torch.device) -> torch.Tensor:
    """(n_blocks, W, 2W) bool: query r of block n may see key c of [block n-1, block n]."""
    r = torch.arange(window, device=device)[:, None]
    c = torch.arange(2 * window, device=device)[None, :]
    band = (c > r) & (c <= r + window)  # 0 <= i - j < W with i = nW + r, j = (n-1)W + c
    mask = band.expand(n_blocks, window, 2 * window).clone()
    mask[0, :, :window] = False  # block 0 has no previous block (left padding)
    return mask


def banded_sliding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                             scale: float, window: int) -> torch.Tensor:
    """Exact sliding-window attention computing only the band: each block of W queries sees 2W keys."""
    B, nh, T, d = q.shape
    n_kv, W = k.shape[1], window
    g = nh // n_kv
    nb = -(-T // W)
    pad = nb * W - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, n_kv, g, nb, W, d)
    kb = F.pad(k, (0, 0, W, pad)).unfold(2, 2 * W, W)  # (B, n_kv, nb, d, 2W)
    vb = F.pad(v, (0, 0, W, pad)).unfold(2, 2 * W, W)  # (B, n_kv, nb, d, 2W)
    scores = torch.einsum("bkgnqd,bkndc->bkgnqc", qb, kb) * scale  # (B, n_kv, g, nb, W, 2W)
    scores = scores.masked_fill(~_band_mask(nb, W, q.device), float("-inf"))
    sink = sinks.view(1, n_kv, g, 1, 1, 1).to(scores.dtype).expand(B, n_kv, g, nb, W, 1)
    probs = _softmax_fp32(torch.cat([scores, sink], dim=-1))[..., :-1]
    out = torch.einsum("bkgnqc,bkndc->bkgnqd", probs.to(v.dtype), vb)  # (B, n_kv, g, nb, W, d)
    return out.reshape(B, nh, nb * W, d)[:, :, :T]


def sink_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Full causal attention with sinks through SDPA's fused causal kernel: one extra dimension, one extra key.

    Queries carry sink_h in the extra dimension; the extra key (position 0) is zero except 1/scale there, so
    its score is exactly sink_h; its value is zero, so it only adds exp(sink_h) to the denominator. A dummy
    query in front keeps plain `is_causal` right (real query i sees the sink and keys 0..i), and v gets a
    zero column so q, k and v share a head size, which the fused (flash) kernel needs: O(T) memory.
    """
    B, nh, T, d = q.shape
    n_kv = k.shape[1]
    q1 = torch.cat([q, sinks.view(1, nh, 1, 1).to(q.dtype).expand(B, nh, T, 1)], dim=-1)
    q1 = torch.cat([q1.new_zeros(B, nh, 1, d + 1), q1], dim=2)  # (B, nh, T+1, d+1)
    sink_key = k.new_zeros(B, n_kv, 1, d + 1)
    sink_key[..., -1] = 1.0 / scale
    k1 = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)  # (B, n_kv, T+1, d+1)
    v1 = F.pad(v, (0, 1, 1, 0))  # zero sink value in front, zero extra column
    out = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=scale, enable_gqa=n_kv != nh)
    return out[:, :, 1:, :d]


@functools.lru_cache(maxsize=16)
def _flex_block_mask(T: int, window: int | None, device: torch.device):  # noqa: ANN202 (BlockMask)
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return q_idx >= kv_idx

    def sliding(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)  # '<': W keys, not W + 1

    return create_block_mask(causal if window is None else sliding, None, None, T, T, device=device)


@functools.cache
def _flex_fn(compiled: bool):  # noqa: ANN202
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def flex_attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                              scale: float, window: int | None) -> torch.Tensor:
    """FlexAttention (compiled on GPU) with the sink folded in afterwards through the log-sum-exp."""
    from torch.nn.attention.flex_attention import AuxRequest

    block_mask = _flex_block_mask(q.shape[2], window, q.device)
    out, aux = _flex_fn(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale,
                                   enable_gqa=k.shape[1] != q.shape[1], return_aux=AuxRequest(lse=True))
    lse = aux.lse
    # softmax with the sink = plain softmax * sum / (sum + exp(sink)) = out * sigmoid(lse - sink)
    return out * torch.sigmoid(lse - sinks.view(1, -1, 1).float()).unsqueeze(-1).to(out.dtype)


class KVCache:
    """Keys and values of one layer for generation: full layers keep every position, sliding layers a
    ring buffer of their last W positions, so their memory stays constant in the generated length."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.capacity = capacity
        self.k = torch.zeros(batch, n_kv, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((capacity,), -1, dtype=torch.long, device=device)  # -1: empty slot

    def attend_and_update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values/positions to attend to (cached ones plus the new ones), then store the new ones."""
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        k_pos = torch.cat([self.pos, positions])
        keep = slice(max(0, k.shape[2] - self.capacity), None)  # a long prompt keeps only what fits
        slots = positions[keep] % self.capacity
        self.k[:, :, slots] = k[:, :, keep]
        self.v[:, :, slots] = v[:, :, keep]
        self.pos[slots] = positions[keep]
        return keys, values, k_pos


class Attention(nn.Module):
    """GQA with q/k/v/o biases, RoPE, per-head sinks; sliding window W on `sliding_attention` layers."""

    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, window: int | None,
                 impl: str = "auto") -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.window = n_heads, n_kv, head_dim, window
        self.scale = 1.0 / math.sqrt(head_dim)
        self.impl = impl  # "auto" (flex on GPU, banded/SDPA on CPU), "eager", "flex", "cpu"
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=True)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=True)
        self.sinks = nn.Parameter(torch.zeros(n_heads, dtype=torch.float32))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        out = self.attend(q, k, v, positions, cache)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               cache: KVCache | None) -> torch.Tensor:
        if cache is not None:
            k, v, k_pos = cache.attend_and_update(k, v, positions)
            return eager_attention(q, k, v, self.sinks, self.scale, self.window, positions, k_pos)
        impl = self.impl if self.impl != "auto" else ("flex" if q.is_cuda else "cpu")
        if impl == "eager":
            return eager_attention(q, k, v, self.sinks, self.scale, self.window, positions, positions)
        if impl == "flex":
            return flex_attention_with_sinks(q, k, v, self.sinks, self.scale, self.window)
        if self.window is not None and self.window < q.shape[2]:
            return banded_sliding_attention(q, k, v, self.sinks, self.scale, self.window)
        return sink_sdpa_attention(q, k, v, self.sinks, self.scale)
