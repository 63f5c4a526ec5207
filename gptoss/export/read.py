"""Reading an export directory back: config and state dict under our names, global expert ids, checked against
the config exactly as a checkpoint's is (`gptoss.checkpoint.read.check_shapes`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptoss.checkpoint.read import check_shapes, expected_shapes
from gptoss.config import ConfigError, ModelConfig
from gptoss.errors import ExportError
from gptoss.export.layout import CONFIG_NAME, HF_CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from gptoss.hf import from_hf_config, from_hf_state_dict


def read_export(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An export dir -> our config and state dict (our names, global experts). Three kinds: ours with HF
    names (config.json + gptoss_config.json), our own format (gptoss_config.json alone: our names), or a
    GptOss HF dir (config.json alone)."""
    from safetensors.torch import load_file

    path = Path(path)
    hf_names = (path / HF_CONFIG_NAME).is_file()
    try:
        if (path / CONFIG_NAME).is_file():
            cfg = ModelConfig.load(path / CONFIG_NAME)
        elif hf_names:
            cfg = from_hf_config(json.loads((path / HF_CONFIG_NAME).read_text()))
        else:
            raise ExportError(f"{path}: no {CONFIG_NAME} or {HF_CONFIG_NAME} (not an export directory)")
    except (ConfigError, KeyError) as e:
        raise ExportError(f"{path}: cannot read the model config ({e})") from e
    if (path / INDEX_NAME).is_file():
        files = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ExportError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    stored: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise ExportError(f"{path / f}: weight shard listed in {INDEX_NAME} is missing")
        stored.update(load_file(str(path / f)))
    state = from_hf_state_dict(stored, cfg) if hf_names else stored  # our own format: our names already
    if cfg.arch == "gpt2" and cfg.tie_word_embeddings and "wte.weight" in state:  # stored once, as the embedding
        state.setdefault("lm_head.weight", state["wte.weight"])
    check_shapes(state, expected_shapes(cfg), str(path), "its config")
    return cfg, state
