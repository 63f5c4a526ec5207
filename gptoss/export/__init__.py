"""Export: a training checkpoint or an in-memory model -> a Hugging Face model directory, and back.

    layout.py   the file names of an export dir
    shards.py   safetensors shards of a bounded size, indexed like transformers' save_pretrained
    write.py    `export` (checkpoint dir -> export dir), `save_model` (model -> export dir), `save_export`
    read.py     `read_export` (export dir -> config + state dict)

Reading the checkpoint itself (ZeRO partitions, expert files, any ep size) is `gptoss.checkpoint.read`;
`load_state_dict` is re-exported here for the callers that consolidate a checkpoint in memory.
"""

from gptoss.checkpoint.read import load_state_dict
from gptoss.errors import ExportError
from gptoss.export.layout import CONFIG_NAME, GENERATION_CONFIG_NAME, HF_CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from gptoss.export.read import read_export
from gptoss.export.shards import ShardWriter, parse_size
from gptoss.export.write import DTYPES, export, save_export, save_model

__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "GENERATION_CONFIG_NAME",
    "HF_CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "ExportError",
    "ShardWriter",
    "export",
    "load_state_dict",
    "parse_size",
    "read_export",
    "save_export",
    "save_model",
]
