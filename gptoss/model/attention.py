"""Grouped-query attention with learned sinks, sliding-window or full causal.

`sdpa` is the reference math as one pure function (openai/gpt-oss `sdpa`): scores `q k^T / sqrt(d)`, the
mask, and one learned logit per query head appended as an extra column before the softmax and dropped after,
`p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik))`. Training runs the kernel chosen when the model was
built (`gptoss.model.kernels.attention`, each equal to `sdpa`); a prompt pass with a KV cache runs `sdpa`
itself, and one-token decode steps `Attention.decode`: the same math on the preallocated cache in place (no
concatenation, no repeated kv heads), with q, k, v fused into one matmul.
Shapes: q (B, n_heads, T, d); k, v (B, n_kv, T, d); query head h reads kv head h // (n_heads / n_kv).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gptoss.config import ModelConfig
from gptoss.model.layers import apply_rotary


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, n_kv, T, d) -> (B, n_heads, T, d) in HF's `repeat_kv` order."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, q_doc: torch.Tensor | None = None,
                   k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query sees: causal, the last W keys including itself on sliding layers, its own story
    (story ids q_doc (B, Tq), k_doc (B, Tk)); k_pos < 0 marks an empty cache slot. Positions (Tq,), (Tk,) give
    (Tq, Tk); per-row positions (B, Tq), (B, Tk) or story ids give (B, 1, Tq, Tk)."""
    rel = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = (k_pos[..., None, :] >= 0) & (rel >= 0)
    if window is not None:
        allowed &= rel < window
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed[:, None] if allowed.dim() == 3 else allowed  # the same for every head


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys and the sink column (broadcast to scores' rows), the sink's share last; in at
    least fp32 (bf16 scores would lose the small probabilities)."""
    full = torch.cat([scores, sink.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)
    return torch.softmax(full, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def attention_probs(q: torch.Tensor, k: torch.Tensor, sinks: torch.Tensor, scale: float,
                    allowed: torch.Tensor) -> torch.Tensor:
    """(B, n_heads, Tq, Tk + 1): each query's probabilities over the keys, then the sink's share."""
    scores = torch.matmul(q, repeat_kv(k, q.shape[1]).transpose(-1, -2)) * scale  # (B, nh, Tq, Tk)
    return softmax_with_sink(scores.masked_fill(~allowed, float("-inf")), sinks.view(1, -1, 1, 1))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float, window: int | None,
         q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None = None,
         k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """The reference attention (any mask, memory O(Tq * Tk)): (B, n_heads, Tq, d)."""
    probs = attention_probs(q, k, sinks, scale, attention_mask(q_pos, k_pos, window, q_doc, k_doc))[..., :-1]
    return torch.matmul(probs.to(v.dtype), repeat_kv(v, q.shape[1]))


class KVCache:
    """Keys and values of one layer for generation: full layers keep every position, sliding layers a
    ring buffer of their last W positions, so their memory stays constant in the generated length.
    Preallocated: a decode step writes one slot in place (`advance`, `write`), so its shapes never change."""

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

    def advance(self, position: torch.Tensor) -> torch.Tensor:
        """Claim the slot of `position` (a (1,) long tensor on the cache's device) for a decode step: (1,)."""
        slot = position % self.capacity
        self.pos.index_copy_(0, slot, position)
        return slot

    def write(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
        """Store one step's keys and values (B, n_kv, 1, d) at `slot` (from `advance`)."""
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch; positions are shared by every row)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


def decode_bias(pos: torch.Tensor, position: torch.Tensor, window: int | None) -> torch.Tensor:
    """(capacity,) additive mask of one decode step: 0 where the query at `position` sees the slot's key (filled,
    inside the window; `advance` already wrote `position`), -inf elsewhere. The same for every layer of a kind."""
    allowed = pos >= 0
    if window is not None:
        allowed &= position - pos < window
    return torch.zeros(pos.shape, dtype=torch.float32, device=pos.device).masked_fill_(~allowed, float("-inf"))


class Attention(nn.Module):
    """GQA with q/k/v/o biases, RoPE and per-head sinks; sliding window W on even layers (`layer_types`).
    `kernel(q, k, v, sinks, scale, window, segments)` computes `sdpa` for training and evaluation."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.window = cfg.sliding_window if sliding else None
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.kernel = kernel
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, n_heads, T, d) and k, v (B, n_kv, T, d) of x (B, T, hidden), q and k rotated."""
        B, T, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, segments: Any = None) -> torch.Tensor:
        """positions (T,), or (B, T) restarting at each story with `segments` (cos/sin per row too)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            k, v, k_pos = cache.attend_and_update(k, v, positions)
            out = sdpa(q, k, v, self.sinks, self.scale, self.window, positions, k_pos)
        else:
            out = self.kernel(q, k, v, self.sinks, self.scale, self.window, segments)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, hidden)

    def prepare_decode(self) -> None:
        """The decode step's weights: q, k, v fused, and every matrix [in, out], the layout MKL's batch-1 matvec
        reads fastest (measured 2x nn.Linear's [out, in] at nano's head and expert shapes on CPU). Copies."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).t().contiguous()
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        sinks = self.sinks.view(1, self.n_kv, self.n_heads // self.n_kv, 1)
        self.decode_weights = (w, b, self.o_proj.weight.t().contiguous(), self.o_proj.bias, sinks)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, slot: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        """One token per row: x (B, hidden) at the position whose cos/sin (1, 1, d/2) in x's dtype, cache slot and
        mask bias (`decode_bias`) are given -> (B, hidden); `sdpa`'s math, after `prepare_decode`."""
        w_qkv, b_qkv, w_o, b_o, sinks = self.decode_weights
        B, nh, nkv, d = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = torch.addmm(b_qkv, x, w_qkv).view(B, nh + 2 * nkv, d)
        x1, x2 = qkv[:, :nh + nkv].chunk(2, dim=-1)  # q and k heads rotated together, as `apply_rotary` does
        qk = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        cache.write(qk[:, nh:, None], qkv[:, nh + nkv:, None], slot)
        q = qk[:, :nh].view(B, nkv, nh // nkv, d)  # query head h reads kv head h // (nh / nkv)
        scores = torch.add(bias, torch.matmul(q, cache.k.transpose(-1, -2)), alpha=self.scale)  # (B, nkv, g, C)
        probs = softmax_with_sink(scores, sinks)[..., :-1]
        out = torch.matmul(probs.to(cache.v.dtype), cache.v)  # (B, nkv, g, d)
        return torch.addmm(b_o, out.view(B, nh * d), w_o)
