"""The GPT-OSS transformer, bottom-up as in the spec:

    x = embed(tokens)
    for each block:  x = x + Attn(RMSNorm(x));  x = x + MoE(RMSNorm(x))
    logits = lm_head(RMSNorm(x))            (untied unembedding)

Parameter names follow Hugging Face's GptOss (without its `model.` prefix) so `hf.py` maps 1:1.
Initialisation: normal(0, 0.02) for embeddings, projections, router and expert up-projections; the
residual output projections (o_proj, expert down_proj) use 0.02 / sqrt(2 * layers) (GPT-2's scaling, so
the residual stream does not grow with depth); biases 0, norm scales 1. Sinks start at 0: one extra
key with score 0, so while attention scores are near 0 a query at position t gives it 1/(t + 2) of its
mass, close to a plain softmax, and the sink is free to learn in either direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptoss.config import ModelConfig
from gptoss.model.attention import Attention, KVCache, decode_bias
from gptoss.model.head import VocabHead
from gptoss.model.kernels.attention import ATTENTION_KERNELS, Segments, prepare_segments
from gptoss.model.layers import RMSNorm, RotaryEmbedding
from gptoss.model.moe import init_experts, moe_layer
from gptoss.model.options import DEFAULT_OPTIONS, ModelOptions


@dataclass
class ModelOutput:
    """What a forward pass returns. With targets, logits are not materialised (chunked loss)."""

    loss: torch.Tensor | None = None  # mean cross-entropy (fp32)
    aux_loss: torch.Tensor | None = None  # load-balancing loss, already times router_aux_loss_coef
    logits: torch.Tensor | None = None  # (B, T, V) when no targets were given
    expert_counts: torch.Tensor | None = None  # (layers, E) assignments per expert on this rank


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), under torch.utils.checkpoint (non-reentrant) when enabled and autograd records: the backward
    pass keeps only the block's inputs and recomputes the rest, one more forward for less activation memory."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ep_size: int, options: ModelOptions) -> None:
        super().__init__()
        self.checkpointing = options.activation_checkpointing
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, ATTENTION_KERNELS[options.attention])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = moe_layer(cfg, ep_size, options.deepspeed_engine)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, segments: Segments | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual stream after this block, and its MoE's aux loss () and expert counts (E,)."""
        return maybe_checkpoint(self.checkpointing and self.training, self._forward, x, cos, sin, positions, cache,
                                segments)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | None, segments: Segments | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, segments)
        h, aux_loss, counts = self.mlp(self.post_attention_layernorm(x))
        return x + h, aux_loss, counts


class GptOss(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1, options: ModelOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        self.config, self.options = cfg, options
        self.head = VocabHead(cfg, options.loss)
        self.embed_tokens = nn.Embedding(cfg.embedding_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, ep_size, options) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.embedding_rows, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        nn.init.normal_(self.embed_tokens.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.lm_head.weight, 0.0, std, generator=generator)
        self.head.reset_rows(self.embed_tokens.weight, self.lm_head.weight)
        for block in self.layers:
            attn = block.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, block.mlp.router):
                nn.init.normal_(proj.weight, 0.0, out_std if proj is attn.o_proj else std, generator=generator)
                nn.init.zeros_(proj.bias)
            nn.init.zeros_(attn.sinks)
            init_experts(block.mlp, std, out_std, generator)
            nn.init.ones_(block.input_layernorm.weight)
            nn.init.ones_(block.post_attention_layernorm.weight)
        nn.init.ones_(self.norm.weight)

    def new_caches(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> list[KVCache]:
        """One KV cache per layer: sliding layers hold W positions, full layers max_len."""
        c = self.config
        return [KVCache(batch, c.num_key_value_heads, c.head_dim,
                        min(max_len, c.sliding_window) if block.self_attn.window else max_len,
                        dtype=dtype, device=device) for block in self.layers]

    def prepare_decode(self, stacked_experts: bool = False) -> None:
        """Derive the weights `decode_step` reads (fused, [in, out]; `MoEFeedForward.prepare_decode`) from the
        parameters, again only after one changed (replaced or modified in place: data pointer or version)."""
        key = (stacked_experts, *((p.data_ptr(), p._version) for p in self.parameters()))
        if self.__dict__.get("_decode_key") == key:
            return
        for block in self.layers:
            block.self_attn.prepare_decode()
            block.mlp.prepare_decode(stacked_experts)
        self.decode_lm_head = self.lm_head.weight.t().contiguous()  # read as .t(): F.linear then runs x @ W
        self.__dict__["_decode_key"] = key

    def decode_step(self, tokens: torch.Tensor, caches: list[KVCache], position: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab_size) of one new token per row, tokens (B,) at `position` ((1,) long tensor on the
        model's device), appended to `caches` in place: `forward`'s math for T = 1 without its training
        plumbing, fixed shapes and no host sync but the eager MoE's (see `prepare_decode`)."""
        cos, sin = (t.to(self.decode_lm_head.dtype).view(1, 1, -1) for t in self.rotary(position))
        x = self.embed_tokens(self.head.rows(tokens))  # (B, hidden)
        kinds: dict[tuple[int, int | None], torch.Tensor] = {}  # one mask per cache kind
        for block, cache in zip(self.layers, caches):
            attn = block.self_attn
            slot = cache.advance(position)
            if (cache.capacity, attn.window) not in kinds:
                kinds[cache.capacity, attn.window] = decode_bias(cache.pos, position, attn.window)
            x = x + attn.decode(block.input_layernorm(x), cos, sin, cache, slot, kinds[cache.capacity, attn.window])
            x = x + block.mlp.decode(block.post_attention_layernorm(x))
        return self.head.logits(self.norm(x), self.decode_lm_head.t())

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, start_pos: int = 0, *, eot_id: int | None = None) -> ModelOutput:
        """Logits, or the loss of `targets`. With `eot_id` (story-aware attention, for training windows) a new
        story starts at each `eot_id` token: attention stays inside a story and rotary positions restart at
        0 there, as when sampling after <|endoftext|>. Decoding with `caches` (one story per row) refuses it.
        Ids, targets and logits are full-vocabulary ones also with a data vocabulary (`gptoss.model.head`)."""
        T = input_ids.shape[1]
        segments = None
        if eot_id is None:
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
        elif caches is not None or start_pos != 0:
            raise ValueError("eot_id (story-aware attention) is for whole training windows, not for decoding with "
                             "caches or start_pos; generation starts each story after <|endoftext|> itself")
        else:
            windows = {block.self_attn.window for block in self.layers}
            segments = prepare_segments(Segments.from_tokens(input_ids, eot_id), self.options.attention, windows)
            positions = segments.positions  # (B, T)
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(self.head.rows(input_ids))  # (B, T, hidden)
        aux_losses, layer_counts = [], []
        for i, block in enumerate(self.layers):
            x, aux_loss, counts = block(x, cos, sin, positions, caches[i] if caches is not None else None,
                                        segments)
            aux_losses.append(aux_loss)
            layer_counts.append(counts)
        x = self.norm(x)
        aux = torch.stack(aux_losses).mean() * self.config.router_aux_loss_coef
        counts = torch.stack(layer_counts)  # (layers, E)
        if targets is None:
            return ModelOutput(logits=self.head.logits(x, self.lm_head.weight), aux_loss=aux, expert_counts=counts)
        return ModelOutput(loss=self.head.loss(x, self.lm_head.weight, targets), aux_loss=aux, expert_counts=counts)
