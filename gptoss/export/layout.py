"""The names of an export directory, in one place for its writer (`write`, `shards`) and its reader (`read`).

    <export dir>/
        model.safetensors               the weights, or model-0000i-of-0000n.safetensors shards plus
        model.safetensors.index.json    an index, named as transformers' save_pretrained names them
        config.json                     transformers' config (absent in our own format, see `write`)
        generation_config.json          transformers' generation defaults (likewise)
        gptoss_config.json              our ModelConfig, always
        tokenizer.json, ...             Hugging Face tokenizer files, for o200k_harmony's vocabulary
"""

from __future__ import annotations

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HF_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
CONFIG_NAME = "gptoss_config.json"


def shard_name(i: int, n: int) -> str:
    """The file name of shard `i` (from 1) of `n`, when the weights do not fit in one."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"
