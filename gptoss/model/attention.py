"""Grouped-query attention with learned sinks, sliding-window or full causal.

Three exact kernels compute the same function (`p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik))`):
- `eager_attention`: the reference (explicit positions, any mask); used by tests and the KV-cache path.
- CPU training: `banded_sliding_attention` touches only the window band (memory O(T*W)), and
  `sink_sdpa_attention` folds the sink into PyTorch SDPA as one extra key (full layers).
- GPU training: `flex_attention_with_sinks`, FlexAttention with a block mask and the log-sum-exp
  correction `out * sigmoid(lse - sink)` (FlexAttention has no CPU backward).
Shapes: q (B, n_heads, T, d); k, v (B, n_kv, T, d); query head h reads kv head h // (n_heads / n_kv).

Story-aware attention (`Segments`, built once per forward from the token ids): a query sees only keys of its
own story, so training sees each story the way sampling generates it (fresh after <|endoftext|>). Each kernel
takes it as an optional `segments` argument and stays exact: eager and banded add "same story" to their masks
(banded per row, still O(T*W)), the SDPA path attends each story alone (`per_story_attention`, stories batched
by length), FlexAttention uses a per-row document block mask. Without it every kernel computes exactly what
it did before (one causal sequence per row).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gptoss.model.layers import apply_rotary


def _softmax_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax in at least fp32 (bf16 scores would lose the small probabilities)."""
    return torch.softmax(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))


@dataclass
class StoryPacking:
    """The stories of a batch, grouped by length for one SDPA call per group (see `per_story_attention`)."""

    buckets: list[tuple[torch.Tensor, torch.Tensor]]  # per length L: token index (n, L) into B*T, valid (n, L)
    inverse: torch.Tensor  # (B*T,): where each token's output lies among the concatenated valid outputs


@dataclass(eq=False)
class Segments:
    """Where the stories of a batch of training windows lie; computed once per forward, shared by every layer.

    A story starts AT each <|endoftext|> token (sampling feeds `[EOT] + prompt`, EOT at position 0), and the
    tokens before a window's first EOT are a story of their own (the window started mid-story). Query t sees
    key s iff `doc_ids[t] == doc_ids[s]` and s <= t (and t - s < W on sliding layers); its rotary position is
    t minus the index of its story's first token. What the kernels derive from this (the SDPA packing, the
    FlexAttention block masks) is built on first use and cached here, so the layers of one forward share it.
    """

    doc_ids: torch.Tensor  # (B, T) long: story number within the row, nondecreasing
    positions: torch.Tensor  # (B, T) long: 0 at the first token of each story
    _packing: StoryPacking | None = field(default=None, init=False, repr=False)
    _block_masks: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_tokens(cls, input_ids: torch.Tensor, eot_id: int) -> Segments:
        """Segments of token windows (B, T) whose stories are separated by `eot_id`."""
        B, T = input_ids.shape
        is_start = input_ids == eot_id
        idx = torch.arange(T, device=input_ids.device).expand(B, T)
        first = torch.where(is_start, idx, 0).cummax(dim=1).values  # index of the first token of its story
        return cls(doc_ids=is_start.long().cumsum(dim=1), positions=idx - first)

    def packing(self) -> StoryPacking:
        """Stories padded to the next power of two (at most T) and grouped by that length: at most
        log2(T) + 1 groups, and the padding at most doubles the tokens, so memory stays linear in T.
        Padding sits after each story's last token: causal attention never lets a real query see it."""
        if self._packing is None:
            T = self.positions.shape[1]
            starts = (self.positions.reshape(-1) == 0).nonzero().squeeze(1)  # each row starts a story
            ends = torch.cat([starts[1:], starts.new_tensor([self.positions.numel()])])
            lengths = ends - starts
            sizes = torch.tensor([min(1 << (n - 1).bit_length(), T) for n in lengths.tolist()])
            buckets, order = [], []
            for size in sizes.unique().tolist():
                sel = (sizes == size).nonzero().squeeze(1).to(starts.device)
                offset = torch.arange(size, device=starts.device)
                index = torch.minimum(starts[sel, None] + offset, ends[sel, None] - 1)  # (n, L), padding repeats
                valid = offset < lengths[sel, None]
                buckets.append((index, valid))
                order.append(index[valid])
            order_t = torch.cat(order)
            inverse = torch.empty_like(order_t)
            inverse[order_t] = torch.arange(order_t.numel(), device=order_t.device)
            self._packing = StoryPacking(buckets, inverse)
        return self._packing

    def block_mask(self, window: int | None):  # noqa: ANN201 (BlockMask)
        """The FlexAttention document mask (B, 1, T, T) for one layer kind, shared by its layers."""
        if window not in self._block_masks:
            self._block_masks[window] = _story_block_mask(self.doc_ids, window)
        return self._block_masks[window]


def per_story_attention(attn_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Run a causal kernel `attn_fn(q, k, v)` on each story alone, the stories of one length group batched:
    exact (no query sees another story), memory linear in T, one kernel call per group."""
    B, T = q.shape[0], q.shape[2]

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3])  # (B*T, heads, d)

    qt, kt, vt = tokens(q), tokens(k), tokens(v)
    packing = segments.packing()
    pieces = []
    for index, valid in packing.buckets:
        out = attn_fn(*(t[index].transpose(1, 2) for t in (qt, kt, vt)))  # (n, heads, L, d)
        pieces.append(out.transpose(1, 2)[valid])  # (real tokens, heads, d)
    out = torch.cat(pieces)[packing.inverse]  # (B*T, heads, d) in token order
    return out.view(B, T, *out.shape[1:]).transpose(1, 2)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                    window: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None = None,
                    k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention. q_pos (Tq,), k_pos (Tk,) are absolute positions (or per row: (B, Tq), (B, Tk));
    k_pos < 0 marks empty slots. With story ids q_doc (B, Tq), k_doc (B, Tk) a query sees only its own story."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # HF repeat_kv order
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, Tq, Tk)
    rel = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = (k_pos[..., None, :] >= 0) & (rel >= 0)  # (Tq, Tk), or (B, Tq, Tk) per row
    if window is not None:
        allowed &= rel < window  # W keys including itself
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    if allowed.dim() == 3:
        allowed = allowed[:, None]  # (B, 1, Tq, Tk): the same for every head
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
    probs = _softmax_fp32(torch.cat([scores, sink], dim=-1))[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _band_mask(n_blocks: int, window: int, device: torch.device) -> torch.Tensor:
    """(n_blocks, W, 2W) bool: query r of block n may see key c of [block n-1, block n]. Cached in eager mode;
    under torch.compile built in the graph (dynamo would trace through the cache anyway, with a warning)."""
    if torch.compiler.is_compiling():
        return _build_band_mask(n_blocks, window, device)
    return _cached_band_mask(n_blocks, window, device)


def _build_band_mask(n_blocks: int, window: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(window, device=device)[:, None]
    c = torch.arange(2 * window, device=device)[None, :]
    band = (c > r) & (c <= r + window)  # 0 <= i - j < W with i = nW + r, j = (n-1)W + c
    mask = band.expand(n_blocks, window, 2 * window).clone()
    mask[0, :, :window] = False  # block 0 has no previous block (left padding)
    return mask


_cached_band_mask = functools.lru_cache(maxsize=16)(_build_band_mask)


def banded_sliding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                             scale: float, window: int, segments: Segments | None = None) -> torch.Tensor:
    """Exact sliding-window attention computing only the band: each block of W queries sees 2W keys.
    With segments the band mask also requires the same story (one mask per row, still O(T*W))."""
    B, nh, T, d = q.shape
    n_kv, W = k.shape[1], window
    g = nh // n_kv
    nb = -(-T // W)
    pad = nb * W - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, n_kv, g, nb, W, d)
    kb = F.pad(k, (0, 0, W, pad)).unfold(2, 2 * W, W)  # (B, n_kv, nb, d, 2W)
    vb = F.pad(v, (0, 0, W, pad)).unfold(2, 2 * W, W)  # (B, n_kv, nb, d, 2W)
    scores = torch.einsum("bkgnqd,bkndc->bkgnqc", qb, kb) * scale  # (B, n_kv, g, nb, W, 2W)
    mask = _band_mask(nb, W, q.device)  # (nb, W, 2W)
    if segments is not None:
        doc = segments.doc_ids
        q_doc = F.pad(doc, (0, pad), value=-1).view(B, nb, W)
        k_doc = F.pad(doc, (W, pad), value=-1).unfold(1, 2 * W, W)  # (B, nb, 2W); pads are banned by the band
        mask = (mask & (q_doc[..., :, None] == k_doc[..., None, :]))[:, None, None]  # (B, 1, 1, nb, W, 2W)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.view(1, n_kv, g, 1, 1, 1).to(scores.dtype).expand(B, n_kv, g, nb, W, 1)
    probs = _softmax_fp32(torch.cat([scores, sink], dim=-1))[..., :-1]
    out = torch.einsum("bkgnqc,bkndc->bkgnqd", probs.to(v.dtype), vb)  # (B, n_kv, g, nb, W, d)
    return out.reshape(B, nh, nb * W, d)[:, :, :T]


def sink_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        scale: float, segments: Segments | None = None) -> torch.Tensor:
    """Full causal attention with sinks through SDPA's fused causal kernel: one extra dimension, one extra key.

    Queries carry sink_h in the extra dimension; the extra key (position 0) is zero except 1/scale there, so
    its score is exactly sink_h; its value is zero, so it only adds exp(sink_h) to the denominator. A dummy
    query in front keeps plain `is_causal` right (real query i sees the sink and keys 0..i), and v gets a
    zero column so q, k and v share a head size, which the fused (flash) kernel needs: O(T) memory.
    With segments each story is attended alone (`per_story_attention`), each with its own sink key.
    """
    if segments is not None:
        return per_story_attention(lambda q_, k_, v_: sink_sdpa_attention(q_, k_, v_, sinks, scale), q, k, v, segments)
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


def _story_block_mask(doc_ids: torch.Tensor, window: int | None):  # noqa: ANN202 (BlockMask)
    """Document mask per row: same story and causal (and inside the window). Key blocks that share no story
    with a query block are skipped, so short stories also cut FlexAttention's work. Built uncompiled, as the
    plain masks are: it evaluates the (B, T, T) grid once per forward and layer kind."""
    from torch.nn.attention.flex_attention import create_block_mask

    def story(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        ok = (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)
        return ok if window is None else ok & (q_idx - kv_idx < window)  # '<': W keys, not W + 1

    B, T = doc_ids.shape
    return create_block_mask(story, B, None, T, T, device=doc_ids.device)


@functools.cache
def _flex_fn(compiled: bool):  # noqa: ANN202
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def flex_attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                              scale: float, window: int | None, segments: Segments | None = None) -> torch.Tensor:
    """FlexAttention (compiled on GPU) with the sink folded in afterwards through the log-sum-exp.
    With segments the block mask is the per-row document mask, built once per forward (`Segments.block_mask`)."""
    from torch.nn.attention.flex_attention import AuxRequest

    if segments is not None:
        block_mask = segments.block_mask(window)
    else:
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
                cache: KVCache | None = None, segments: Segments | None = None) -> torch.Tensor:
        """positions (T,), or (B, T) with segments (story-aware: then cos/sin are per row too)."""
        B, T, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        out = self.attend(q, k, v, positions, cache, segments)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               cache: KVCache | None, segments: Segments | None = None) -> torch.Tensor:
        if cache is not None and segments is not None:
            raise ValueError("story-aware attention (segments) does not combine with a KV cache")
        if cache is not None:
            k, v, k_pos = cache.attend_and_update(k, v, positions)
            return eager_attention(q, k, v, self.sinks, self.scale, self.window, positions, k_pos)
        impl = self.impl if self.impl != "auto" else ("flex" if q.is_cuda else "cpu")
        if impl == "eager":
            doc = segments.doc_ids if segments is not None else None
            return eager_attention(q, k, v, self.sinks, self.scale, self.window, positions, positions, doc, doc)
        if impl == "flex":
            return flex_attention_with_sinks(q, k, v, self.sinks, self.scale, self.window, segments)
        if self.window is not None and self.window < q.shape[2]:
            return banded_sliding_attention(q, k, v, self.sinks, self.scale, self.window, segments)
        return sink_sdpa_attention(q, k, v, self.sinks, self.scale, segments)
