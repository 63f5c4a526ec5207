"""Attention kernels: `ATTENTION_KERNELS` name -> `fn(q, k, v, sinks, scale, window, segments) -> out`, each
exactly `gptoss.model.attention.sdpa` (shapes as there; `segments` None or the batch's stories).

- eager: the reference itself (explicit mask, memory O(T^2)).
- cpu: `banded_sliding_attention` on sliding layers (only the window band, O(T*W)) and `sink_sdpa_attention`
  on full ones (PyTorch's fused causal SDPA with the sink as one extra key, O(T)): 21-33x and 3.7-5.9x
  transformers' eager attention from T=4096 on CPU (BENCHMARKS 2).
- flex: FlexAttention with a block mask and the LSE sink correction, the GPU path (it has no CPU backward).
- auto: flex on CUDA, cpu elsewhere.

Story-aware attention (`Segments`, built once per forward from the token ids and handed to every layer): a
query sees only keys of its own story. Eager and banded add "same story" to their masks, the SDPA path
attends each story alone (`per_story_attention`, stories batched by length), FlexAttention uses a per-row
document block mask. BENCHMARKS 6 measures what that costs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptoss.model.attention import sdpa, softmax_with_sink


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
    t minus the index of its story's first token. The SDPA packing and the FlexAttention block masks are cached
    here; a model builds what its kernel reads before the first layer (`prepare_segments`), so every layer of a
    forward finds the same state: a compiled block guards on it, and a cache filled by the first layers would
    compile the block again for the later ones.
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
        """The FlexAttention story mask (B, 1, T, T) for one layer kind, shared by its layers."""
        if window not in self._block_masks:
            self._block_masks[window] = _flex_mask(window, self.doc_ids.shape[1], self.doc_ids.device, self.doc_ids,
                                                   compiled=self.doc_ids.is_cuda)
        return self._block_masks[window]


def uses_flex(kernel: str, device: torch.device) -> bool:
    """Whether ATTENTION_KERNELS[kernel] runs FlexAttention on `device`."""
    return kernel == "flex" or (kernel == "auto" and device.type == "cuda")


def prepare_segments(segments: Segments, kernel: str, windows: Iterable[int | None]) -> Segments:
    """Build what ATTENTION_KERNELS[kernel] reads from `segments` for the layer kinds `windows` (sliding W, full
    None), once per forward before the first layer: FlexAttention's block masks, or the SDPA packing."""
    if uses_flex(kernel, segments.doc_ids.device):
        for window in windows:
            segments.block_mask(window)
    elif kernel in ("cpu", "auto"):
        segments.packing()
    return segments


@torch.compiler.disable  # its groups are data-dependent: traced, each batch's story lengths would compile anew
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
                    window: int | None, segments: Segments | None = None) -> torch.Tensor:
    """The reference: index positions give the story mask too (inside a story they differ alike)."""
    pos = torch.arange(q.shape[2], device=q.device)
    doc = segments.doc_ids if segments is not None else None
    return sdpa(q, k, v, sinks, scale, window, pos, pos, doc, doc)


def _build_band_mask(n_blocks: int, window: int, device: torch.device) -> torch.Tensor:
    """(n_blocks, W, 2W) bool: query r of block n may see key c of [block n-1, block n]."""
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
    # cached in eager mode; under torch.compile built in the graph (dynamo would trace the cache with a warning)
    band = _build_band_mask if torch.compiler.is_compiling() else _cached_band_mask
    mask = band(nb, W, q.device)  # (nb, W, 2W)
    if segments is not None:
        doc = segments.doc_ids
        q_doc = F.pad(doc, (0, pad), value=-1).view(B, nb, W)
        k_doc = F.pad(doc, (W, pad), value=-1).unfold(1, 2 * W, W)  # (B, nb, 2W); pads are banned by the band
        mask = (mask & (q_doc[..., :, None] == k_doc[..., None, :]))[:, None, None]  # (B, 1, 1, nb, W, 2W)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = softmax_with_sink(scores, sinks.view(1, n_kv, g, 1, 1, 1))[..., :-1]
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


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                  window: int | None, segments: Segments | None = None) -> torch.Tensor:
    """Banded on sliding layers shorter than the sequence, fused SDPA on the others."""
    if window is not None and window < q.shape[2]:
        return banded_sliding_attention(q, k, v, sinks, scale, window, segments)
    return sink_sdpa_attention(q, k, v, sinks, scale, segments)


def _flex_mask(window: int | None, T: int, device: torch.device, doc_ids: torch.Tensor | None = None,
               compiled: bool = False):  # noqa: ANN202
    """FlexAttention block mask: causal, inside the window ('<': W keys, not W + 1), and with `doc_ids` (B, T)
    in the same story per row (key blocks sharing no story with a query block are skipped). `compiled`: created
    through torch.compile (story masks on CUDA, new each batch), as eager creation evaluates the mask function
    on all B x T x T pairs one tensor op at a time."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        ok = q_idx >= kv_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        return ok if doc_ids is None else ok & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(mask, None if doc_ids is None else doc_ids.shape[0], None, T, T, device=device,
                             _compile=compiled)


_cached_flex_mask = functools.lru_cache(maxsize=16)(_flex_mask)


@functools.cache
def _flex_fn(compiled: bool):  # noqa: ANN202
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def flex_attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                              scale: float, window: int | None, segments: Segments | None = None) -> torch.Tensor:
    """FlexAttention (compiled on GPU) with the sink folded in afterwards through the log-sum-exp."""
    from torch.nn.attention.flex_attention import AuxRequest

    if segments is not None:
        block_mask = segments.block_mask(window)
    else:
        block_mask = _cached_flex_mask(window, q.shape[2], q.device)
    out, aux = _flex_fn(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale,
                                   enable_gqa=k.shape[1] != q.shape[1], return_aux=AuxRequest(lse=True))
    # softmax with the sink = plain softmax * sum / (sum + exp(sink)) = out * sigmoid(lse - sink)
    return out * torch.sigmoid(aux.lse - sinks.view(1, -1, 1).float()).unsqueeze(-1).to(out.dtype)


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                   window: int | None, segments: Segments | None = None) -> torch.Tensor:
    """FlexAttention on CUDA, the CPU kernels elsewhere (decided per call: a model may move after it is built)."""
    kernel = flex_attention_with_sinks if q.is_cuda else cpu_attention
    return kernel(q, k, v, sinks, scale, window, segments)


AttentionKernel = Callable[..., torch.Tensor]
ATTENTION_KERNELS: dict[str, AttentionKernel] = {
    "auto": auto_attention,
    "flex": flex_attention_with_sinks,
    "cpu": cpu_attention,
    "eager": eager_attention,
}
ATTENTION_IMPLS = tuple(ATTENTION_KERNELS)
