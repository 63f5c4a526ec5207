"""Model configuration: one dataclass, named presets, and all parameter / FLOP arithmetic.

Field names follow Hugging Face's `GptOssConfig` so that the export mapping in `hf.py` stays obvious.
This is the only place that counts parameters or FLOPs; reports and MFU logging call these functions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss.errors import UserError
from gptoss.tokenizer import EOT_ID, VOCAB_SIZE


class ConfigError(UserError):
    """A configuration value is invalid; the message names the key and what was expected."""


@dataclass
class ModelConfig:
    """Shape and numerics of a GPT-OSS (or GPT-2 baseline) model."""

    arch: str = "gpt_oss"  # "gpt_oss" or "gpt2" (the dense baseline)
    vocab_size: int = VOCAB_SIZE  # o200k_harmony's
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 4096
    # GPT-OSS only
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    intermediate_size: int = 1024
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling: dict[str, Any] | None = None  # HF-style YaRN dict, None for plain RoPE
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    router_aux_loss_coef: float = 0.01
    # GPT-2 baseline only
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
    # both
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    layer_types: list[str] = field(default_factory=list)
    # The data vocabulary (kept set: gptoss.data.vocab; head: gptoss.model.head): sorted full ids given their own
    # rows; every other id shares one tail row. None = all vocab_size rows. vocab_size stays the semantic
    # (exported) vocabulary either way.
    kept_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            # Sliding window on even layers, full causal on odd ones (the released models' pattern).
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                value = f" ({len(self.kept_ids)} ids)" if key == "kept_ids" else f"={getattr(self, key)!r}"
                raise ConfigError(f"model config: {key}{value}: {msg}")

        need(self.arch in ("gpt_oss", "gpt2"), "arch", "expected 'gpt_oss' or 'gpt2'")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "max_position_embeddings", "num_key_value_heads"):
            need(int(getattr(self, key)) >= 1, key, "must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"must be divisible by num_key_value_heads={self.num_key_value_heads}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"needs one entry per layer ({self.num_hidden_layers})")
        need(all(t in ("sliding_attention", "full_attention") for t in self.layer_types), "layer_types",
             "entries must be 'sliding_attention' or 'full_attention'")
        if (ids := self.kept_ids) is not None:
            need(all(isinstance(i, int) and not isinstance(i, bool) for i in ids), "kept_ids",
                 "expected a list of integer token ids")
            need(all(a < b for a, b in zip(ids, ids[1:])), "kept_ids", "must be sorted and without repeats")
            need(not ids or (ids[0] >= 0 and ids[-1] < self.vocab_size), "kept_ids",
                 f"ids must lie in [0, vocab_size={self.vocab_size})")
            need(1 <= len(ids) < self.vocab_size, "kept_ids", f"needs at least one id and fewer than vocab_size="
                 f"{self.vocab_size} (with every id kept, use kept_ids=null)")
            need(self.vocab_size <= EOT_ID or EOT_ID in set(ids), "kept_ids",
                 f"must include <|endoftext|> ({EOT_ID}), which starts every story")
        if self.arch == "gpt2":
            need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
                 "the GPT-2 baseline uses multi-head attention (kv heads == heads)")
            return
        need(self.num_local_experts >= 1, "num_local_experts", "must be >= 1")
        need(1 <= self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"must be between 1 and num_local_experts={self.num_local_experts}")
        need(self.intermediate_size >= 1, "intermediate_size", "must be >= 1")
        need(self.sliding_window >= 1, "sliding_window", "must be >= 1 (keys seen, including itself)")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.rope_scaling is not None:
            need(self.rope_scaling.get("rope_type") == "yarn", "rope_scaling",
                 "only {'rope_type': 'yarn'} is supported (or null for plain RoPE)")
            need(float(self.rope_scaling.get("factor", 1.0)) >= 1.0, "rope_scaling", "factor must be >= 1")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def trained_vocab_size(self) -> int:
        """Rows that stand for tokens: every id, or the kept ids plus one shared tail row (what parameter and FLOP
        counts use; the weights hold `embedding_rows`)."""
        return self.vocab_size if self.kept_ids is None else len(self.kept_ids) + 1

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding and head weights: with a data vocabulary trained_vocab_size rounded up to a multiple
        of 64 (zero pad rows before the tail row, `gptoss.model.head`), so the logits' row stride is 16-byte
        aligned in the head's matmuls; the full vocabulary (201,088 = 64 x 3,142) as it is. Derived, never saved."""
        rows = self.trained_vocab_size
        return rows if self.kept_ids is None else -(-rows // 64) * 64

    def exported(self) -> ModelConfig:
        """The full-vocabulary config an export holds (kept_ids expanded away)."""
        return self if self.kept_ids is None else dataclasses.replace(self, kept_ids=None)

    @property
    def is_moe(self) -> bool:
        return self.arch == "gpt_oss"

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    # ---- JSON round trip ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json_object(path), source=str(path))


def read_json_object(path: str | Path) -> dict:
    """The JSON object in a file; a ConfigError names the file when it is missing, bad JSON or not an object
    (callers at another boundary re-raise it as their own error type)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


YARN_131K = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The A40 default: GQA 8:1 as in GPT-OSS, 8 experts top-2.
    "nano": dict(),
    # A few-layer model for tests and the CPU quickstart (small vocab allowed only in tests).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                 sliding_window=16, max_position_embeddings=256),
    # The CPU comparison pairs (BENCHMARKS 10): GPT-OSS / GPT-2 with matched non-embedding active parameters
    # that train one epoch of the shared TinyStories subset in under 30 minutes each on 2 CPU cores: mini
    # (6.26M vs 6.32M; 16 minutes, room for a busy machine) and mini-320 (9.87M vs 9.86M; 23 minutes quiet).
    # Sliding window 128 as in the released models.
    "mini": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=32, num_local_experts=4, num_experts_per_tok=2, intermediate_size=400,
                 max_position_embeddings=1024),
    "mini-320": dict(hidden_size=320, num_hidden_layers=8, num_attention_heads=10, num_key_value_heads=2,
                     head_dim=32, num_local_experts=4, num_experts_per_tok=2, intermediate_size=512,
                     max_position_embeddings=1024),
    # The released shapes.
    "gpt-oss-20b": dict(hidden_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, num_local_experts=32, num_experts_per_tok=4, intermediate_size=2880,
                        max_position_embeddings=131072, rope_scaling=YARN_131K, router_aux_loss_coef=0.9),
    "gpt-oss-120b": dict(hidden_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, num_local_experts=128, num_experts_per_tok=4, intermediate_size=2880,
                         max_position_embeddings=131072, rope_scaling=YARN_131K, router_aux_loss_coef=0.9),
    # Dense GPT-2 baseline with the nano width, depth, vocab and context.
    "gpt2-nano": dict(arch="gpt2", num_key_value_heads=8, tie_word_embeddings=True),
    "gpt2-tiny": dict(arch="gpt2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True),
    "gpt2-mini": dict(arch="gpt2", hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True),
    "gpt2-mini-320": dict(arch="gpt2", hidden_size=320, num_hidden_layers=8, num_attention_heads=10,
                          num_key_value_heads=10, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True),
}


def get_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """A preset by name, or a JSON file written by `ModelConfig.save`; keyword overrides win."""
    if name_or_path in PRESETS:
        return ModelConfig(**{**PRESETS[name_or_path], **overrides})
    if name_or_path.endswith(".json") or Path(name_or_path).exists():
        return dataclasses.replace(ModelConfig.load(name_or_path), **overrides)
    raise ConfigError(f"model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a JSON config file")


# ---- parameter and FLOP arithmetic ---------------------------------------------------------------

def _attention_params(c: ModelConfig) -> int:
    h = c.hidden_size
    if c.arch == "gpt2":
        return 3 * (h * c.q_dim + c.q_dim) + c.q_dim * h + h
    kv_dim = c.num_key_value_heads * c.head_dim
    return (h * c.q_dim + c.q_dim) + 2 * (h * kv_dim + kv_dim) + (c.q_dim * h + h) + c.num_attention_heads


def _expert_params(c: ModelConfig) -> int:
    h, i = c.hidden_size, c.intermediate_size
    return (h * 2 * i + 2 * i) + (i * h + h)


def _vocab_rows(c: ModelConfig, vocab: str) -> int:
    return {"trained": c.trained_vocab_size, "exported": c.vocab_size}[vocab]


def param_counts(c: ModelConfig, vocab: str = "trained") -> dict[str, int]:
    """Parameter counts: total, active per token (top-k of E experts), embedding, unembedding, per part.

    OpenAI quotes `total` and `active_excl_unembedding` (20.915B / 3.608B for gpt-oss-20b). With a data
    vocabulary (`kept_ids`), vocab="trained" counts the rows trained (kept ids + tail), "exported" the
    201,088-row model an export holds; without one both are the same.
    """
    h, L = c.hidden_size, c.num_hidden_layers
    rows = _vocab_rows(c, vocab)
    embed = rows * h
    unembed = 0 if c.tie_word_embeddings else rows * h
    attn = _attention_params(c) * L
    if c.arch == "gpt2":
        inner = c.mlp_ratio * h
        mlp_total = mlp_active = (h * inner + inner + inner * h + h) * L
        norms = (2 * 2 * h) * L + 2 * h  # LayerNorm weight + bias
        embed += c.max_position_embeddings * h
        router = 0
    else:
        router = (h * c.num_local_experts + c.num_local_experts) * L
        mlp_total = _expert_params(c) * c.num_local_experts * L + router
        mlp_active = _expert_params(c) * c.num_experts_per_tok * L + router
        norms = 2 * h * L + h
    total = embed + unembed + attn + mlp_total + norms
    active = embed + unembed + attn + mlp_active + norms
    return {
        "total": total,
        "active": active,
        "embedding": embed,
        "unembedding": unembed,
        "attention": attn,
        "mlp_total": mlp_total,
        "mlp_active": mlp_active,
        "norms": norms,
        "total_excl_unembedding": total - unembed,
        "active_excl_unembedding": active - unembed,
        "non_embedding_total": total - embed - unembed,
        "non_embedding_active": active - embed - unembed,
    }


def attention_span(c: ModelConfig, layer: int, seq_len: int) -> float:
    """Mean number of keys a query attends to in `layer` for a causal sequence of `seq_len`."""
    if c.arch == "gpt_oss" and c.layer_types[layer] == "sliding_attention" and c.sliding_window < seq_len:
        w = c.sliding_window
        # First w queries see 1..w keys, the rest see w.
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    return (seq_len + 1) / 2


def flops_per_token(c: ModelConfig, seq_len: int, training: bool = True, vocab: str = "trained") -> float:
    """Model FLOPs per token: 2 per active matmul weight, plus attention scores and values.

    Training counts forward + backward (3x forward), as in the PaLM MFU definition. Attention uses the
    causal span, with the window for sliding layers, so long sequences are not over-counted. `vocab` as in
    `param_counts`: the data vocabulary's head is kept ids + tail ("trained") or all 201,088 ("exported").
    """
    p = param_counts(c, vocab)
    matmul_params = p["active"] - p["embedding"] - p["norms"]  # the embedding lookup is not a matmul
    if c.tie_word_embeddings:
        matmul_params += _vocab_rows(c, vocab) * c.hidden_size  # a tied embedding is still the unembedding
    fwd = 2.0 * matmul_params
    for layer in range(c.num_hidden_layers):
        # QK^T and PV: 2 matmuls x 2 FLOPs x span x q_dim
        fwd += 4.0 * attention_span(c, layer, seq_len) * c.q_dim
    return 3.0 * fwd if training else fwd


def kv_cache_bytes_per_token(c: ModelConfig, context: int, bytes_per_elem: int = 2) -> dict[str, float]:
    """KV-cache bytes per token of context for MHA, GQA, and GQA with sliding-window layers."""
    per_layer_mha = 2 * c.num_attention_heads * c.head_dim * bytes_per_elem
    per_layer_gqa = 2 * c.num_key_value_heads * c.head_dim * bytes_per_elem
    L = c.num_hidden_layers
    n_sliding = sum(t == "sliding_attention" for t in c.layer_types) if c.arch == "gpt_oss" else 0
    sliding_share = min(c.sliding_window, context) / context if n_sliding else 1.0
    gqa_sw = per_layer_gqa * ((L - n_sliding) + n_sliding * sliding_share)
    return {"mha": per_layer_mha * L, "gqa": per_layer_gqa * L, "gqa_sliding": gqa_sw}
