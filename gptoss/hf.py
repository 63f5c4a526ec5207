"""The one place that knows Hugging Face names: our state dicts and configs <-> transformers'
`GptOssForCausalLM` (and `GPT2LMHeadModel` for the baseline).

Our GPT-OSS keys equal HF's minus the `model.` prefix, except the experts: we keep one module per expert
(`gptoss.model.moe.expert_key`, DeepSpeed's layout, so ZeRO and expert checkpoints work) and HF stacks them
(`model.layers.N.mlp.experts.<name>`, [E, ...]).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from gptoss.config import ModelConfig
from gptoss.model.moe import EXPERT_KEY, expert_key
from gptoss.tokenizer import BOS_ID, EOT_ID, RETURN_ID

HF_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\w+)$")
GPT2_CONV1D_KEY = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # HF's Conv1D: [in, out], our Linear: [out, in]

# Special ids as in the released configs (see gpt-oss-architecture.md): pad is <|endoftext|>, eos <|return|>.
PAD_ID, EOS_ID = EOT_ID, RETURN_ID


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict (all experts present, global expert ids) -> HF GptOss state dict."""
    if cfg.arch == "gpt2":
        return to_hf_gpt2_state_dict(state_dict, cfg)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = EXPERT_KEY.match(key)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            out[f"model.{key}"] = value
    for (layer, name), per_expert in sorted(experts.items()):  # every expert: the readers check the keys
        out[f"model.layers.{layer}.mlp.experts.{name}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GptOss (or GPT2LMHeadModel) state dict -> ours (ep_size 1: every expert local, local id = global id)."""
    if cfg.arch == "gpt2":
        return from_hf_gpt2_state_dict(hf_state, cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        m = HF_EXPERT_KEY.match(key)
        if m:
            for e in range(value.shape[0]):
                out[expert_key(int(m[1]), e, m[2])] = value[e]
        else:
            out[key.removeprefix("model.")] = value  # lm_head.weight has no prefix
    return out


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers' GptOss, readable by 4.55 through 5.x.

    RoPE is written both ways: legacy `rope_theta` + `rope_scaling` (4.55-4.57) and `rope_parameters`
    (5.x, which would otherwise default a missing value to YaRN); see `hf_max_position_embeddings`.
    """
    if cfg.arch == "gpt2":
        return hf_gpt2_config(cfg, torch_dtype)
    scaling = dict(cfg.rope_scaling, truncate=False) if cfg.rope_scaling else None
    max_pos = hf_max_position_embeddings(cfg)
    rope_parameters = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return special_ids(cfg) | story_prefix(cfg) | {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "experts_per_token": cfg.num_experts_per_tok,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "max_position_embeddings": max_pos,
        "initial_context_length": scaling["original_max_position_embeddings"] if scaling else max_pos,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "rms_norm_eps": cfg.rms_norm_eps,
        "swiglu_limit": cfg.swiglu_limit,
        "swiglu_alpha": cfg.swiglu_alpha,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def hf_max_position_embeddings(cfg: ModelConfig) -> int:
    """The context config.json states: with YaRN, factor x original (so 4.55's recomputed factor matches)."""
    scaling = cfg.rope_scaling if cfg.arch == "gpt_oss" else None
    if scaling:
        return int(scaling["factor"] * scaling["original_max_position_embeddings"])
    return cfg.max_position_embeddings


def special_ids(cfg: ModelConfig) -> dict[str, int | None]:
    """The harmony special ids, or None for the small test vocabularies that do not contain them."""
    has = cfg.vocab_size > max(BOS_ID, EOS_ID, PAD_ID, EOT_ID)
    eos = EOS_ID if cfg.arch == "gpt_oss" else EOT_ID
    return {"bos_token_id": BOS_ID if has else None, "eos_token_id": eos if has else None,
            "pad_token_id": PAD_ID if has else None}


def story_prefix(cfg: ModelConfig) -> dict[str, str]:
    """config.json's `prefix`: the text transformers' text-generation pipeline puts before every prompt. A story
    follows <|endoftext|> in training and in launch/sample.py, so the pipeline starts it there too (and returns
    the prompt and new text without it); the tokenizer itself adds nothing (ids = tiktoken's)."""
    return {"prefix": "<|endoftext|>"} if cfg.vocab_size > EOT_ID else {}


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a GptOss config.json dict (inverse of `hf_config`)."""
    scaling = d.get("rope_scaling") or d.get("rope_parameters")
    if scaling and scaling.get("rope_type") != "yarn":
        scaling = None
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"], max_position_embeddings=d["max_position_embeddings"],
        num_local_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
        intermediate_size=d["intermediate_size"], sliding_window=d["sliding_window"],
        rope_theta=d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 150000.0),
        rope_scaling={k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None,
        rms_norm_eps=d["rms_norm_eps"], swiglu_limit=d.get("swiglu_limit", 7.0),
        swiglu_alpha=d.get("swiglu_alpha", 1.702), initializer_range=d.get("initializer_range", 0.02),
        layer_types=list(d["layer_types"]), router_aux_loss_coef=d.get("router_aux_loss_coef", 0.01),
    )


# ---- GPT-2 baseline -> GPT2LMHeadModel -----------------------------------------------------------

def to_hf_gpt2_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our GPT-2 baseline state dict -> GPT2LMHeadModel's."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            out[key] = value
            continue
        out[f"transformer.{key}"] = value.t().contiguous() if GPT2_CONV1D_KEY.search(key) else value
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def hf_incompatibility(cfg: ModelConfig) -> str | None:
    """Why transformers cannot hold this config (then it is exported in our own format), or None.

    Every GPT-OSS config maps to GptOss. For the GPT-2 baseline, GPT2Attention has no head_dim of its own:
    it uses n_embd // n_head and projects q, k, v and the output at width n_embd, so our head_dim fits only
    when num_attention_heads * head_dim == hidden_size. Everything else maps: tied or untied embeddings
    (tie_word_embeddings), n_inner = mlp_ratio * hidden, gelu_new (our tanh GELU), 1/sqrt(head_dim)
    scaling, layer_norm_epsilon, n_positions, any vocabulary.
    """
    if cfg.arch == "gpt2" and cfg.q_dim != cfg.hidden_size:
        return (f"GPT2LMHeadModel needs num_attention_heads * head_dim == hidden_size, but this config has "
                f"{cfg.num_attention_heads} * {cfg.head_dim} = {cfg.q_dim} != hidden_size {cfg.hidden_size}")
    return None


def hf_gpt2_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    reason = hf_incompatibility(cfg)
    if reason:
        raise ValueError(reason)  # export checks first and writes its own format instead
    return special_ids(cfg) | story_prefix(cfg) | {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_hidden_layers,
        "n_head": cfg.num_attention_heads,
        "n_positions": cfg.max_position_embeddings,
        "n_inner": cfg.mlp_ratio * cfg.hidden_size,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": torch_dtype,
    }


def from_hf_gpt2_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel state dict -> our GPT-2 baseline (inverse of `to_hf_gpt2_state_dict`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if re.search(r"\.attn\.(bias|masked_bias)$", key):
            continue  # causal-mask buffers of older transformers, not weights
        name = key.removeprefix("transformer.")  # lm_head.weight has no prefix
        out[name] = value.t().contiguous() if GPT2_CONV1D_KEY.search(name) else value
    if cfg.tie_word_embeddings and "wte.weight" in out:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def hf_generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """generation_config.json. Stories end with <|endoftext|> (EOT_ID), so it stops generation as well as
    <|return|> (EOS_ID, the released models' end of a harmony reply); pad is <|endoftext|> as released."""
    ids = special_ids(cfg)
    eos = [EOT_ID, EOS_ID] if cfg.arch == "gpt_oss" else EOT_ID
    return {"bos_token_id": ids["bos_token_id"], "eos_token_id": eos if ids["eos_token_id"] is not None else None,
            "pad_token_id": ids["pad_token_id"]}
