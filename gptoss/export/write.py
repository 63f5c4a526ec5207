"""Writing an export directory: a training checkpoint (`export`, read by `gptoss.checkpoint.read`) or an
in-memory model (`save_model`) -> a Hugging Face model directory, on CPU.

`save_export` takes pieces of our state dict and writes them, in HF names, as safetensors shards
(`shards`), with config.json, generation_config.json and our gptoss_config.json (names in `layout`), plus the
Hugging Face tokenizer files for o200k_harmony's vocabulary (`gptoss.hf_tokenizer`), so `AutoTokenizer` and
`pipeline("text-generation", model=out)` work and encode exactly as tiktoken does. The output is written to a
temporary sibling directory and renamed at the end, so a failed export never leaves a half-written model;
tensors are streamed, so peak memory is about one shard plus one piece.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from gptoss.checkpoint.read import Checkpoint, iter_state_chunks, n_files_to_read, open_checkpoint
from gptoss.config import ModelConfig
from gptoss.errors import ExportError
from gptoss.export.layout import CONFIG_NAME, GENERATION_CONFIG_NAME, HF_CONFIG_NAME
from gptoss.export.shards import ShardWriter, parse_size
from gptoss.export.vocab import expand_state_dict
from gptoss.hf import hf_config, hf_generation_config, hf_incompatibility, to_hf_state_dict
from gptoss.hf_tokenizer import tokenizer_files_wanted, write_tokenizer_files

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

log = logging.getLogger("gptoss.export")  # the package's name: the one logger users filter on for its warnings


def _stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    for t in ckpt.states["module"].values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def export(path: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None,
           config: ModelConfig | str | os.PathLike | None = None, dtype: str | None = None,
           master_weights: bool = False, max_shard_size: int | str = "5GB", overwrite: bool = False,
           progress: bool = True, tokenizer: str = "auto", verify_checkpoint: bool = False) -> Path:
    """Checkpoint -> export dir `out` (see `save_export`), after checking the checkpoint against its manifest
    (file sizes; with verify_checkpoint the crc32 of every file). dtype: "bf16" or "fp32"; None keeps the
    checkpoint's (fp32 with master_weights)."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    _check_out(Path(out), overwrite)
    ckpt = open_checkpoint(path, tag, config, verify_checkpoint)
    target = DTYPES[dtype] if dtype else (torch.float32 if master_weights else _stored_dtype(ckpt))

    from tqdm.auto import tqdm

    with tqdm(total=n_files_to_read(ckpt, master_weights), desc=f"export {ckpt.tag_dir.name}", unit="file",
              disable=not progress) as bar:
        chunks = iter_state_chunks(ckpt, master_weights, lambda: bar.update(1))
        return save_export(chunks, ckpt.config, out, dtype=target, max_shard_size=max_shard_size,
                           overwrite=overwrite, tokenizer=tokenizer)


def save_model(model: torch.nn.Module, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
               max_shard_size: int | str = "5GB", overwrite: bool = False, tokenizer: str = "auto") -> Path:
    """An in-memory model (ep_size 1, so every expert is local under its global id) -> export dir."""
    return save_export([model.state_dict()], model.config, out, dtype=dtype, max_shard_size=max_shard_size,
                       overwrite=overwrite, tokenizer=tokenizer)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def save_export(chunks: Iterable[dict[str, torch.Tensor]], cfg: ModelConfig, out: str | os.PathLike, *,
                dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                overwrite: bool = False, tokenizer: str = "auto") -> Path:
    """Write pieces of our state dict (global expert ids) as an HF model dir; dtype None keeps each tensor's own.

    A config transformers cannot represent (`hf_incompatibility`) is written in our own format: the same shards
    under our state-dict names plus gptoss_config.json, no config.json or generation_config.json (so nothing
    mistakes it for a transformers dir), and a warning on the `gptoss.export` logger says why. A tied
    lm_head.weight is stored once, as the embedding. A data-vocabulary model is written as the full-vocabulary
    model it equals (`gptoss.export.vocab`), its configs without kept_ids.

    tokenizer: "auto" adds the tokenizer files when cfg has o200k_harmony's vocabulary and `tokenizers` is
    installed (a warning when only the package is missing), "yes" requires both (TokenizerExportError before
    anything is written), "no" never."""
    out = Path(out)
    trained_cfg, cfg = cfg, cfg.exported()
    _check_out(out, overwrite)
    writer_bytes = parse_size(max_shard_size)
    reason = hf_incompatibility(cfg)
    with_tokenizer = tokenizer_files_wanted(cfg, tokenizer, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = ShardWriter(tmp, writer_bytes)
        stored = None
        for chunk in chunks:
            chunk = expand_state_dict(chunk, trained_cfg)
            named = to_hf_state_dict(chunk, cfg) if reason is None else dict(chunk)
            if cfg.arch == "gpt2" and cfg.tie_word_embeddings:
                named.pop("lm_head.weight", None)  # tied to (transformer.)wte.weight, as save_pretrained does
            for name, tensor in named.items():
                tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
                stored = tensor.dtype if stored is None else stored
                writer.add(name, tensor)
        writer.finish()
        if reason is None:
            torch_dtype = str(dtype or stored or torch.float32).removeprefix("torch.")
            (tmp / HF_CONFIG_NAME).write_text(json.dumps(hf_config(cfg, torch_dtype), indent=2) + "\n")
            (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(hf_generation_config(cfg), indent=2) + "\n")
        cfg.save(tmp / CONFIG_NAME)
        if with_tokenizer:
            write_tokenizer_files(tmp, cfg)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if reason is not None:
        log.warning("%s: written in gptoss's own format (our weight names + %s, no %s), not as a transformers "
                    "directory: %s; load it with gptoss.generate.load_model or launch/sample.py",
                    out, CONFIG_NAME, HF_CONFIG_NAME, reason)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished export into place; an existing `out` is removed only after that succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
