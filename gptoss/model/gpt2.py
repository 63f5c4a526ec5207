"""The GPT-2 baseline: LayerNorm, learned absolute positions, multi-head attention, GELU MLP, tied
embeddings. Same width, depth, vocabulary and context as the GPT-OSS preset it is compared with.

Names follow HF's GPT2LMHeadModel (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, ...) so export is a
transpose of the Linear weights (HF stores them as Conv1D, [in, out]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptoss.config import ModelConfig
from gptoss.model.gptoss import ModelOutput, maybe_checkpoint
from gptoss.model.head import VocabHead
from gptoss.model.kernels.attention import Segments, per_story_attention
from gptoss.model.options import DEFAULT_OPTIONS, ModelOptions


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.q_dim)
        self.c_proj = nn.Linear(cfg.q_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.c_attn(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2))
        if segments is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # each story alone: causal SDPA never crosses <|endoftext|>
            out = per_story_attention(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True),
                                      q, k, v, segments)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, -1))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
        return maybe_checkpoint(self.checkpointing and self.training, self._forward, x, segments)

    def _forward(self, x: torch.Tensor, segments: Segments | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), segments)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: ModelConfig, options: ModelOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        self.config, self.options = cfg, options
        # With a data vocabulary the tied tail row is both the shared input row and the tail output row.
        self.head = VocabHead(cfg, options.loss)
        self.wte = nn.Embedding(cfg.embedding_rows, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, options.activation_checkpointing) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.embedding_rows, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2's scheme: normal(0, 0.02) (an untied head too), residual projections 0.02 / sqrt(2 * layers),
        biases 0."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif isinstance(module, (GPT2Attention, GPT2MLP)):
                for linear in module.children():
                    s = out_std if linear is module.c_proj else std
                    nn.init.normal_(linear.weight, 0.0, s, generator=generator)
                    nn.init.zeros_(linear.bias)
        if not self.config.tie_word_embeddings:  # an untied head is a matrix like the others, not torch's default
            nn.init.normal_(self.lm_head.weight, 0.0, std, generator=generator)
        self.head.reset_rows(self.wte.weight, self.lm_head.weight)  # tied: the embedding's shared row too

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, eot_id: int | None = None,
                **_: object) -> ModelOutput:
        """Logits, or the loss of `targets`; caches/start_pos are accepted and ignored (it decodes by
        recomputing). With `eot_id` each story (starting at an `eot_id` token) is attended alone and its
        learned positions restart at 0, as in `GptOss.forward`."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        segments = None
        if eot_id is not None:  # packed before the first block, so every (compiled) block sees the same Segments
            segments = Segments.from_tokens(input_ids, eot_id)
            segments.packing()
        positions = torch.arange(T, device=input_ids.device) if segments is None else segments.positions
        x = self.wte(self.head.rows(input_ids)) + self.wpe(positions)
        for block in self.h:
            x = block(x, segments)
        x = self.ln_f(x)
        zero = x.new_zeros((), dtype=torch.float32)
        if targets is None:
            return ModelOutput(logits=self.head.logits(x, self.lm_head.weight), aux_loss=zero)
        return ModelOutput(loss=self.head.loss(x, self.lm_head.weight, targets), aux_loss=zero)
