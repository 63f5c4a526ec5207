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
from gptoss.export.layout import CONFIG_NAME, HF_CONFIG_NAME
from gptoss.export.read import read_export
from gptoss.export.write import export, save_export, save_model

__all__ = [
    "CONFIG_NAME",
    "HF_CONFIG_NAME",
    "ExportError",
    "export",
    "load_state_dict",
    "read_export",
    "save_export",
    "save_model",
]
