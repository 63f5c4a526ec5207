"""Per-head attention probabilities and sink mass of a GPT-OSS model on one prompt.

The training kernels never materialise probabilities, so they are recomputed here with the model's own
reference math: each attention module's inputs are captured with a forward pre-hook (its normed hidden states
and the model's cos/sin), q and k come from the module's `qkv`, and the probabilities from
`gptoss.model.attention.attention_probs` with the layer's `attention_mask`. The sink's share is the extra
column, `exp(sink_h) / (exp(sink_h) + sum_k exp(s_ik))`: how much of each query's attention goes nowhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gptoss.analysis import AnalysisError
from gptoss.analysis.loading import check_token_ids, encode, load_model, token_strings
from gptoss.analysis.plots import plot_attention
from gptoss.model.attention import attention_mask, attention_probs


@dataclass
class AttentionMap:
    """One layer on one prompt: probs (heads, T, T) over keys, sink (heads, T) per query; rows sum to 1."""

    layer: int
    kind: str  # "sliding_attention" or "full_attention"
    window: int | None
    probs: torch.Tensor
    sink: torch.Tensor

    @property
    def sink_mass_per_head(self) -> torch.Tensor:
        """Mean over queries of the probability given to the sink, per head (heads,)."""
        return self.sink.mean(-1)


def _config(model: nn.Module):  # noqa: ANN202 (ModelConfig)
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "arch", None) != "gpt_oss":
        raise AnalysisError(f"{type(model).__name__}: attention maps need a GPT-OSS model (learned sinks)")
    return cfg


@torch.no_grad()
def attention_maps(model: nn.Module, input_ids: torch.Tensor, layers: list[int] | None = None
                   ) -> list[AttentionMap]:
    """Attention maps of the given layers (default: first sliding and first full) for one prompt (1, T)."""
    cfg = _config(model)
    if layers is None:  # the first sliding and the first full layer (the two kinds GPT-OSS alternates)
        layers = [cfg.layer_types.index(t) for t in ("sliding_attention", "full_attention") if t in cfg.layer_types]
    bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise AnalysisError(f"layers {bad}: the model has layers 0..{cfg.num_hidden_layers - 1}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise AnalysisError(f"one prompt at a time (got a batch of {input_ids.shape[0]})")
    captured: dict[int, tuple[torch.Tensor, ...]] = {}
    hooks = [model.layers[i].self_attn.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[:4])) for i in layers]
    was_training = model.training
    try:
        model.eval()
        model(input_ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    maps = []
    for i in layers:
        attn = model.layers[i].self_attn
        x, cos, sin, positions = captured[i]
        q, k, _ = attn.qkv(x, cos, sin)
        full = attention_probs(q, k, attn.sinks, attn.scale, attention_mask(positions, positions, attn.window))
        maps.append(AttentionMap(layer=i, kind=cfg.layer_types[i], window=attn.window,
                                 probs=full[0, ..., :-1].cpu(), sink=full[0, ..., -1].cpu()))
    return maps


def attention_figure(model: nn.Module, input_ids: torch.Tensor, out_dir: str | Path, layers: list[int] | None = None,
                     tokens: list[str] | None = None) -> dict[str, Path]:
    """attention.png (per-head maps + sink bars), attention.md (sink mass per head per layer) and
    attention.json (the same numbers, with the token ids)."""
    maps = attention_maps(model, input_ids, layers)
    out = Path(out_dir)
    paths = {"png": out / "attention.png", "md": out / "attention.md", "json": out / "attention.json"}
    plot_attention(maps, paths["png"], tokens=tokens)
    n_heads = maps[0].probs.shape[0]
    head = "| layer | kind | " + " | ".join(f"h{h}" for h in range(n_heads)) + " |\n|---|---|" + "---:|" * n_heads
    rows = [f"| {m.layer} | {m.kind} | " + " | ".join(f"{v:.3f}" for v in m.sink_mass_per_head.tolist()) + " |"
            for m in maps]
    paths["md"].write_text(f"Mean probability on the sink per head ({input_ids.numel()} tokens):\n\n"
                           + head + "\n" + "\n".join(rows) + "\n")
    paths["json"].write_text(json.dumps({
        "token_ids": input_ids.flatten().tolist(),
        "layers": [{"layer": m.layer, "kind": m.kind, "window": m.window,
                    "sink_mass_per_head": m.sink_mass_per_head.tolist()} for m in maps],
    }, indent=2) + "\n")
    return paths


def attention_report(model: str | Path, out_dir: str | Path, *, prompt: str | None = None,
                     token_ids: list[int] | None = None, layers: list[int] | None = None) -> dict[str, Path]:
    """The `analyze.py attention` command: load a model, encode the prompt (else take the ids), draw the maps."""
    net = load_model(model)
    vocab = net.config.vocab_size
    ids = encode(prompt, vocab) if prompt is not None else check_token_ids(token_ids, vocab)
    return attention_figure(net, torch.tensor([ids]), out_dir, layers, tokens=token_strings(ids))
