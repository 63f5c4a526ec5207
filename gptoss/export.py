"""DeepSpeed training checkpoint -> Hugging Face model directory, on CPU, without launching any ranks.

DeepSpeed's `zero_to_fp32` refuses MoE checkpoints, so consolidation is ours. One checkpoint tag holds

    mp_rank_00_model_states.pt                          non-expert weights ("module"), client state
                                                        ("model_config"), "num_experts" per MoE layer
    layer_{M}_expert_{E}_mp_rank_00_model_states.pt     one file per MoE layer M and GLOBAL expert id E,
                                                        written by whichever expert-parallel rank owns E
    [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt  rank r's flat fp32 master partitions (ZeRO-1/2)

The default export reads the module weights (bf16 or fp32, as trained). `master_weights=True` (`--fp32`)
rebuilds the fp32 master weights from the optimizer partitions instead (see `_master_weights`).

A missing `latest`/tag/expert file, or weights whose keys or shapes differ from the model config, raise
`ExportError` naming the file, the key, and expected vs found (files are checked for presence before any
weight is read, shapes as each piece is read). The output is written to a temporary sibling directory and
renamed at the end, so a failed export never leaves a half-written model. Tensors are streamed (non-expert
weights, then one MoE layer at a time) into safetensors shards, so peak memory is about one shard plus one
layer's experts (the --fp32 path holds the whole fp32 model: partitions must be reassembled first).

A GPT-2 baseline whose shape transformers' GPT2LMHeadModel cannot hold (num_attention_heads * head_dim !=
hidden_size, see `gptoss.hf.hf_incompatibility`) is written in our own format instead: the same
safetensors shards under our state-dict names, gptoss_config.json, and no config.json (so nothing mistakes
it for a transformers directory); a warning says why. `read_export` and `gptoss.generate.load_model` read
both formats: a directory without config.json holds our names.

A model with o200k_harmony's 201,088 ids also gets Hugging Face tokenizer files (tokenizer.json,
tokenizer_config.json, special_tokens_map.json; see `gptoss.hf_tokenizer`), so
`transformers.AutoTokenizer.from_pretrained(out)` and `pipeline("text-generation", model=out)` work and
encode exactly as tiktoken does. `tokenizer="auto"` (the default) writes them when the `tokenizers` package
(part of transformers) is installed and says so in one warning when it is not; "yes" makes either missing an
error; "no" leaves them out. Small (test) vocabularies never get them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptoss.config import ConfigError, ModelConfig, get_config
from gptoss.errors import UserError
from gptoss.hf import (
    EXPERT_KEY,
    EXPERT_PARAMS,
    expert_key,
    hf_config,
    hf_generation_config,
    hf_incompatibility,
    to_hf_state_dict,
)
from gptoss.hf_tokenizer import tokenizer_files_wanted, write_tokenizer_files

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HF_CONFIG_NAME = "config.json"
CONFIG_NAME = "gptoss_config.json"

log = logging.getLogger(__name__)


class ExportError(UserError):
    """The checkpoint cannot be exported as asked; the message names the file or key and what was expected."""


# ---- locating the checkpoint and its config --------------------------------------------------------------

@dataclass
class Checkpoint:
    """One checkpoint tag, opened: its directory, model config and the (memory-mapped) model states."""

    tag_dir: Path
    config: ModelConfig
    config_source: str
    states: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.tag_dir.name


def _is_tag_dir(path: Path) -> bool:
    return (path / MODEL_STATES).is_file()


def locate_tag_dir(path: str | os.PathLike, tag: str | None = None) -> Path:
    """A run dir (`<run>/checkpoints/...`), a checkpoints dir (with `latest`) or a tag dir -> the tag dir."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint path {path} does not exist")
    if tag is None and _is_tag_dir(path):
        return path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            tags = sorted(p.name for p in ckpt_dir.iterdir() if _is_tag_dir(p)) if ckpt_dir.is_dir() else []
            hint = f"; pass --tag, one of {tags}" if tags else "; no checkpoint tag directories found either"
            raise ExportError(f"{latest}: no 'latest' file naming the checkpoint tag{hint}")
        tag = latest.read_text().strip()
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise ExportError(f"checkpoint tag {tag!r}: directory {tag_dir} not found")
    if not _is_tag_dir(tag_dir):
        raise ExportError(f"{tag_dir / MODEL_STATES}: not found (not a complete DeepSpeed checkpoint tag)")
    return tag_dir


def _load(path: Path) -> Any:
    """torch.load on CPU, memory-mapped so big files are paged in as read.

    DeepSpeed's files pickle its own classes (ZeRO stage enum, fragment addresses), so they need
    weights_only=False, exactly as DeepSpeed's own loader does: only export checkpoints you trust.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which one
        raise ExportError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from e


def _resolve_config(tag_dir: Path, states: dict[str, Any],
                    config: ModelConfig | str | os.PathLike | None) -> tuple[ModelConfig, str]:
    """The model config: explicit > the checkpoint's client state > model_config.json of the run dir."""
    try:
        if isinstance(config, ModelConfig):
            return config, "the given config"
        if config is not None:
            return get_config(str(config)), str(config)
        if isinstance(states.get("model_config"), dict):
            return ModelConfig.from_dict(states["model_config"]), f"{tag_dir / MODEL_STATES}['model_config']"
        for candidate in (tag_dir.parent.parent / "model_config.json", tag_dir.parent / "model_config.json"):
            if candidate.is_file():
                return ModelConfig.load(candidate), str(candidate)
    except ConfigError as e:
        raise ExportError(str(e)) from e
    raise ExportError(f"{tag_dir}: no model config found (no 'model_config' in {MODEL_STATES}, no "
                      "model_config.json in the run dir); pass --config PRESET_OR_JSON")


def open_checkpoint(path: str | os.PathLike, tag: str | None = None,
                    config: ModelConfig | str | os.PathLike | None = None) -> Checkpoint:
    tag_dir = locate_tag_dir(path, tag)
    if any(tag_dir.glob("*mp_rank_01_*")):
        raise ExportError(f"{tag_dir}: tensor/model-parallel checkpoints (mp_rank_01 files) are not supported")
    states = _load(tag_dir / MODEL_STATES)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise ExportError(f"{tag_dir / MODEL_STATES}: no 'module' state dict (not a DeepSpeed model states file)")
    cfg, source = _resolve_config(tag_dir, states, config)
    return Checkpoint(tag_dir, cfg, source, states)


# ---- reading and checking the weights ------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every key of our full state dict (global expert ids) and its shape, built on the meta device."""
    from gptoss.model import build_model

    return {k: v.shape for k, v in build_model(cfg, device="meta").state_dict().items()}


def _check(found: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str, source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        k = missing[0]
        raise ExportError(f"{where}: missing key {k} (expected shape {list(expected[k])} from {source})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        k = unexpected[0]
        raise ExportError(f"{where}: unexpected key {k} (shape {list(found[k].shape)}) not in the model of "
                          f"{source}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for k, t in found.items():
        if t.shape != expected[k]:
            raise ExportError(f"{where}: {k} has shape {list(t.shape)}, but {source} expects "
                              f"{list(expected[k])}: the config does not match the weights")


def _expert_file(tag_dir: Path, moe_layer: int, expert: int) -> Path:
    return tag_dir / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def _check_expert_counts(ckpt: Checkpoint) -> None:
    cfg, found = ckpt.config, ckpt.states.get("num_experts")
    want = [cfg.num_local_experts] * cfg.num_hidden_layers if cfg.is_moe else []
    if found is not None and list(found) != want:
        raise ExportError(f"{ckpt.tag_dir / MODEL_STATES}: num_experts per MoE layer is {list(found)}, but "
                          f"{ckpt.config_source} expects {want}: the config does not match the weights")


def _split(expected: dict[str, torch.Size]) -> tuple[dict[str, torch.Size], dict[int, dict[str, torch.Size]]]:
    """Expected shapes -> (non-expert keys, {layer: that layer's expert keys})."""
    dense: dict[str, torch.Size] = {}
    per_layer: dict[int, dict[str, torch.Size]] = {}
    for k, shape in expected.items():
        m = EXPERT_KEY.match(k)
        if m:
            per_layer.setdefault(int(m[1]), {})[k] = shape
        else:
            dense[k] = shape
    return dense, per_layer


def iter_module_chunks(ckpt: Checkpoint, progress: Any = None) -> Iterator[dict[str, torch.Tensor]]:
    """Our state dict in validated pieces: the non-expert weights, then each MoE layer's experts
    gathered from the per-expert files of every expert-parallel rank (global ids)."""
    cfg = ckpt.config
    _check_expert_counts(ckpt)
    dense_shapes, layer_shapes = _split(expected_shapes(cfg))
    layers = sorted(layer_shapes)
    for moe_layer, layer in enumerate(layers):  # all present? (before reading gigabytes)
        for e in range(cfg.num_local_experts):
            f = _expert_file(ckpt.tag_dir, moe_layer, e)
            if not f.is_file():
                n = len(list(ckpt.tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")))
                raise ExportError(
                    f"{f}: expert file missing (layer {layer}, expert {e}); found {n} of "
                    f"{len(layers) * cfg.num_local_experts} expert files in {ckpt.tag_dir}. With expert "
                    "parallelism each rank writes its own experts: copy the files of every rank/node")
    dense = _checked_dense(ckpt, dense_shapes)
    _tick(progress)
    yield dense
    for moe_layer, layer in enumerate(layers):
        experts: dict[str, torch.Tensor] = {}
        for e in range(cfg.num_local_experts):
            f = _expert_file(ckpt.tag_dir, moe_layer, e)
            part = _load(f)
            want = {expert_key(layer, e, name) for name in EXPERT_PARAMS}
            if not isinstance(part, dict) or set(part) != want:
                got = sorted(part) if isinstance(part, dict) else type(part).__name__
                raise ExportError(f"{f}: expected keys {sorted(want)}, found {got}")
            experts.update(part)
            _tick(progress)
        _check(experts, layer_shapes[layer], f"{ckpt.tag_dir} (layer {layer} expert files)", ckpt.config_source)
        yield experts


def _checked_dense(ckpt: Checkpoint, dense_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The non-expert weights of "module", checked against the config. DeepSpeed keeps experts out of
    "module" for MoE models; any copy there would carry local ids."""
    dense = {k: v for k, v in ckpt.states["module"].items() if not EXPERT_KEY.match(k)}
    _check(dense, dense_shapes, str(ckpt.tag_dir / MODEL_STATES), ckpt.config_source)
    return dense


def _tick(progress: Any) -> None:
    if progress is not None:
        progress.update(1)


def _n_files(ckpt: Checkpoint, master_weights: bool) -> int:
    if master_weights:
        return len(_optim_files(ckpt.tag_dir)) + 1
    return 1 + (ckpt.config.num_hidden_layers * ckpt.config.num_local_experts if ckpt.config.is_moe else 0)


# ---- fp32 master weights from the ZeRO-1/2 optimizer partitions ------------------------------------------

def _optim_files(tag_dir: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for p in tag_dir.iterdir():
        m = OPTIM_FILE.match(p.name)
        if m and m[2] == "00":
            files[int(m[1])] = p
    return files


def _master_weights(ckpt: Checkpoint, expected: dict[str, torch.Size], progress: Any = None
                    ) -> dict[str, torch.Tensor]:
    """The fp32 master weights, reassembled from every rank's flat optimizer partitions.

    Each `[bf16_]zero_pp_rank_{r}` file holds, per parameter group, rank r's slice of the group's flat
    fp32 buffer and `param_slice_mappings` (name -> start, numel of the part of each parameter in that
    slice). Non-expert groups are partitioned over all ranks (partition id = r); MoE groups (`moe: True`)
    over the expert-data-parallel group: with DeepSpeed's default layout rank r is expert-parallel rank
    r % ep and expert-data-parallel rank r // ep, and its expert names carry LOCAL ids, so global id =
    (r % ep) * E_local + local. Concatenating a parameter's parts in partition order gives it whole.
    """
    cfg, tag_dir = ckpt.config, ckpt.tag_dir
    files = _optim_files(tag_dir)
    if not files:
        raise ExportError(f"{tag_dir}: --fp32 needs the ZeRO-1/2 optimizer states "
                          "([bf16_]zero_pp_rank_*_mp_rank_00_optim_states.pt); this checkpoint has none")
    world = max(files) + 1
    missing = sorted(set(range(world)) - set(files))
    expected_world = ckpt.states.get("dp_world_size", world)
    if missing or len(files) != expected_world:
        absent = missing or list(range(len(files), expected_world))
        raise ExportError(f"{tag_dir}: optimizer state files of rank(s) {absent} missing "
                          f"(dp_world_size {expected_world}, found {len(files)})")
    E_total = cfg.num_local_experts
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for r in range(world):
        osd = _load(files[r]).get("optimizer_state_dict", {})
        needed = ("single_partition_of_fp32_groups", "param_slice_mappings", "partition_count")
        if not all(k in osd for k in needed):
            raise ExportError(f"{files[r]}: not a ZeRO-1/2 optimizer state (needs {list(needed)})")
        groups = osd["base_optimizer_state"]["param_groups"]
        for g, (flat, mapping) in enumerate(zip(osd["single_partition_of_fp32_groups"],
                                                osd["param_slice_mappings"])):
            order = r
            ep = 1
            if groups[g].get("moe", False):
                ep = world // int(osd["partition_count"][g])
                order = r // ep
            for name, frag in mapping.items():
                m = EXPERT_KEY.match(name)
                if m and ep > 1:
                    name = expert_key(int(m[1]), (r % ep) * (E_total // ep) + int(m[2]), m[3])
                piece = flat.narrow(0, frag.start, frag.numel).clone()
                parts.setdefault(name, []).append((order, piece))
        _tick(progress)
    out: dict[str, torch.Tensor] = {}
    for name, pieces in parts.items():
        if name not in expected:
            raise ExportError(f"{tag_dir}: optimizer states hold {name!r}, which the model of "
                              f"{ckpt.config_source} does not have: the config does not match the weights")
        pieces.sort(key=lambda op: op[0])
        flat = torch.cat([p for _, p in pieces])
        if flat.numel() != expected[name].numel():
            raise ExportError(f"{tag_dir}: optimizer partitions of {name} hold {flat.numel()} values, but "
                              f"{ckpt.config_source} expects shape {list(expected[name])}")
        out[name] = flat.view(expected[name])
    if cfg.tie_word_embeddings:  # one parameter, one optimizer entry: its other name is not listed
        for a, b in (("lm_head.weight", "wte.weight"), ("lm_head.weight", "embed_tokens.weight")):
            if a in expected and a not in out and b in out:
                out[a] = out[b]
    absent = sorted(set(expected) - set(out))
    if absent:
        raise ExportError(f"{tag_dir}: fp32 master weights of {absent[:3]}{' ...' if len(absent) > 3 else ''} "
                          "not found in the optimizer states (frozen parameters are not supported)")
    return out


def _master_chunks(ckpt: Checkpoint, progress: Any = None) -> Iterator[dict[str, torch.Tensor]]:
    _check_expert_counts(ckpt)
    expected = expected_shapes(ckpt.config)
    # The module weights are checked too: a config that does not match them must not slip through.
    _checked_dense(ckpt, _split(expected)[0])
    _tick(progress)
    yield _master_weights(ckpt, expected, progress)


def iter_state_chunks(ckpt: Checkpoint, master_weights: bool = False,
                      progress: Any = None) -> Iterator[dict[str, torch.Tensor]]:
    """Validated pieces of our full state dict, from the module weights or the fp32 master weights."""
    return _master_chunks(ckpt, progress) if master_weights else iter_module_chunks(ckpt, progress)


def load_state_dict(path: str | os.PathLike, tag: str | None = None,
                    config: ModelConfig | str | os.PathLike | None = None,
                    master_weights: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The consolidated state dict (our names, global expert ids) and config of a checkpoint, in memory."""
    ckpt = open_checkpoint(path, tag, config)
    state: dict[str, torch.Tensor] = {}
    for chunk in iter_state_chunks(ckpt, master_weights):
        state.update(chunk)
    return ckpt.config, state


# ---- writing safetensors shards ------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, like transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ExportError(f"max_shard_size {size!r}: expected bytes or a size like '5GB' or '500MiB'")
    unit = (m[2] or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m[1]) * base**power)


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (a bigger single tensor gets its own shard), named and
    indexed like transformers' `save_pretrained`: model.safetensors, or model-0000i-of-0000n.safetensors
    plus model.safetensors.index.json."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out_dir / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates 0600 files; an export is meant to be shared
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.out_dir / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, keys) in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


# ---- export ----------------------------------------------------------------------------------------------

def _stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    for t in ckpt.states["module"].values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def export(path: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None,
           config: ModelConfig | str | os.PathLike | None = None, dtype: str | None = None,
           master_weights: bool = False, max_shard_size: int | str = "5GB", overwrite: bool = False,
           progress: bool = True, tokenizer: str = "auto") -> Path:
    """Checkpoint -> `out`: safetensors weights in HF names, config.json, generation_config.json and our
    gptoss_config.json; with o200k_harmony's vocabulary also the Hugging Face tokenizer files (`tokenizer`:
    "auto", "yes" or "no", see `save_export`).

    dtype: "bf16" or "fp32"; None keeps the checkpoint's (fp32 with master_weights). The GPT-2 baseline
    exports to a `GPT2LMHeadModel` directory when its shape allows, otherwise to our own format (see
    `save_export`).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    _check_out(Path(out), overwrite)
    ckpt = open_checkpoint(path, tag, config)
    target = DTYPES[dtype] if dtype else (torch.float32 if master_weights else _stored_dtype(ckpt))

    from tqdm.auto import tqdm

    with tqdm(total=_n_files(ckpt, master_weights), desc=f"export {ckpt.tag}", unit="file",
              disable=not progress) as bar:
        return save_export(iter_state_chunks(ckpt, master_weights, bar), ckpt.config, out, dtype=target,
                           max_shard_size=max_shard_size, overwrite=overwrite, tokenizer=tokenizer)


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
    """Write pieces of our state dict (global expert ids) as an HF model dir, via a temporary directory
    renamed into place at the end. dtype None keeps each tensor's own.

    A config transformers cannot represent (`hf_incompatibility`) is written in our own format: the same
    shards under our state-dict names plus gptoss_config.json, without config.json and
    generation_config.json; a warning on the `gptoss.export` logger (stderr when logging is not set up)
    says why. A tied lm_head.weight is stored once, as the embedding, in both formats.

    tokenizer: "auto" adds the Hugging Face tokenizer files (`gptoss.hf_tokenizer.TOKENIZER_FILES`) when
    cfg has o200k_harmony's vocabulary and the `tokenizers` package is installed (a warning when only the
    package is missing), "yes" requires both (TokenizerExportError before anything is written), "no" never.
    They are written inside the temporary directory, so a failed build leaves nothing either."""
    out = Path(out)
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
            named = to_hf_state_dict(chunk, cfg) if reason is None else dict(chunk)
            if cfg.arch == "gpt2" and cfg.tie_word_embeddings:
                named.pop("lm_head.weight", None)  # tied to (transformer.)wte.weight, as save_pretrained does
            for name, tensor in named.items():
                tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
                stored = tensor.dtype if stored is None else stored
                writer.add(name, tensor)
        writer.finish()
        if reason is None:
            torch_dtype = DTYPE_NAMES.get(dtype or stored or torch.float32, "float32")
            (tmp / HF_CONFIG_NAME).write_text(json.dumps(hf_config(cfg, torch_dtype), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(hf_generation_config(cfg), indent=2) + "\n")
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


def read_export(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An export dir -> our config and state dict (our names, global experts). Three kinds: ours with HF
    names (config.json + gptoss_config.json), our own format (gptoss_config.json alone: our names), or a
    GptOss HF dir (config.json alone)."""
    from safetensors.torch import load_file

    from gptoss.hf import from_hf_config, from_hf_gpt2_state_dict, from_hf_state_dict

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
    if not hf_names:  # our own format: our names already; a tied lm_head is stored as the embedding
        state = stored
        if cfg.arch == "gpt2" and cfg.tie_word_embeddings and "wte.weight" in state:
            state.setdefault("lm_head.weight", state["wte.weight"])
    elif cfg.arch == "gpt2":
        state = from_hf_gpt2_state_dict(stored, cfg)
    else:
        state = from_hf_state_dict(stored, cfg)
    _check(state, expected_shapes(cfg), str(path), "its config")
    return cfg, state
