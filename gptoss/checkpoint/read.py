"""Reading a DeepSpeed training checkpoint offline, on CPU and without launching any ranks, into our full
state dict (our names, global expert ids): what export writes out and what sampling loads in memory.

DeepSpeed's `zero_to_fp32` refuses MoE checkpoints, so consolidation is ours (the files of a tag are listed in
`gptoss.checkpoint.layout`). A tag is checked against its manifest before anything is loaded, and every piece
against the model config as it is read; each failure is a `CheckpointError` naming the file, the key, and expected
vs found. The module weights come in pieces (non-expert weights, then one MoE layer at a time), so a consumer that
streams them holds about one layer's experts at once; the fp32 master weights (`master_weights=True`) come whole,
since the optimizer partitions must be reassembled first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptoss.checkpoint.layout import (
    CHECKPOINTS_DIR,
    LATEST,
    MODEL_STATES,
    OPTIM_FILE,
    expert_file,
    read_latest,
)
from gptoss.checkpoint.manifest import check_checkpoint
from gptoss.config import ConfigError, ModelConfig, get_config
from gptoss.errors import CheckpointError
from gptoss.model import build_model
from gptoss.model.moe import EXPERT_KEY, EXPERT_PARAMS, expert_key

# ---- locating the checkpoint and its config --------------------------------------------------------------

@dataclass
class Checkpoint:
    """One checkpoint tag, opened: its directory, model config and the (memory-mapped) model states."""

    tag_dir: Path
    config: ModelConfig
    config_source: str
    states: dict[str, Any]


def _is_tag_dir(path: Path) -> bool:
    return (path / MODEL_STATES).is_file()


def locate_tag_dir(path: str | os.PathLike, tag: str | None = None) -> Path:
    """A run dir (`<run>/checkpoints/...`), a checkpoints dir (with `latest`) or a tag dir -> the tag dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if tag is None and _is_tag_dir(path):
        return path
    ckpt_dir = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if tag is None:
        tag = read_latest(ckpt_dir)
        if tag is None:
            tags = sorted(p.name for p in ckpt_dir.iterdir() if _is_tag_dir(p)) if ckpt_dir.is_dir() else []
            hint = f"; pass --tag, one of {tags}" if tags else "; no checkpoint tag directories found either"
            raise CheckpointError(f"{ckpt_dir / LATEST}: no 'latest' file naming the checkpoint tag{hint}")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint tag {tag!r}: directory {tag_dir} not found")
    return tag_dir


def _load(path: Path) -> Any:
    """torch.load on CPU, memory-mapped so big files are paged in as read.

    DeepSpeed's files pickle its own classes (ZeRO stage enum, fragment addresses), so they need
    weights_only=False, exactly as DeepSpeed's own loader does: only export checkpoints you trust.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which one
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from e


def open_checkpoint(path: str | os.PathLike, tag: str | None = None,
                    config: ModelConfig | str | os.PathLike | None = None,
                    verify_checkpoint: bool = False) -> Checkpoint:
    """Locate the tag, check it against its manifest (sizes; crc32 too with verify_checkpoint), open it."""
    tag_dir = locate_tag_dir(path, tag)
    check_checkpoint(tag_dir, verify_checkpoint, "export it with --tag")
    states = _load(tag_dir / MODEL_STATES)  # a DeepSpeed model states file: the manifest vouches for it
    try:  # the given config, else the one the trainer saved in the client state
        if isinstance(config, ModelConfig):
            return Checkpoint(tag_dir, config, "the given config", states)
        if config is not None:
            return Checkpoint(tag_dir, get_config(str(config)), str(config), states)
        source = f"{tag_dir / MODEL_STATES}['model_config']"
        return Checkpoint(tag_dir, ModelConfig.from_dict(states["model_config"], source), source, states)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


# ---- reading and checking the weights ------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every key of our full state dict (global expert ids) and its shape, built on the meta device."""
    return {k: v.shape for k, v in build_model(cfg, device="meta").state_dict().items()}


def check_shapes(found: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str, source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        k = missing[0]
        raise CheckpointError(f"{where}: missing key {k} (expected shape {list(expected[k])} from {source})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{where}: unexpected key {k} (shape {list(found[k].shape)}) not in the model of "
                              f"{source}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for k, t in found.items():
        if t.shape != expected[k]:
            raise CheckpointError(f"{where}: {k} has shape {list(t.shape)}, but {source} expects "
                                  f"{list(expected[k])}: the config does not match the weights")


def iter_state_chunks(ckpt: Checkpoint, master_weights: bool = False,
                      tick: Callable[[], object] = lambda: None) -> Iterator[dict[str, torch.Tensor]]:
    """Validated pieces of our full state dict: the non-expert weights, then each MoE layer's experts gathered
    from the per-expert files of every expert-parallel rank (global ids); with `master_weights`, the fp32 master
    weights in one piece instead. `tick` is called after each file read (a progress bar)."""
    cfg, found = ckpt.config, ckpt.states.get("num_experts")
    want = [cfg.num_local_experts] * cfg.num_hidden_layers if cfg.is_moe else []
    if found is not None and list(found) != want:
        raise CheckpointError(f"{ckpt.tag_dir / MODEL_STATES}: num_experts per MoE layer is {list(found)}, but "
                              f"{ckpt.config_source} expects {want}: the config does not match the weights")
    expected = expected_shapes(cfg)
    per_layer: dict[int, dict[str, torch.Size]] = {}
    for k, shape in expected.items():
        if m := EXPERT_KEY.match(k):
            per_layer.setdefault(int(m[1]), {})[k] = shape
    # DeepSpeed keeps experts out of "module" for MoE models; any copy there would carry local ids. The module
    # weights are checked with master_weights too: a config that does not match them must not slip through.
    dense = {k: v for k, v in ckpt.states["module"].items() if not EXPERT_KEY.match(k)}
    check_shapes(dense, {k: v for k, v in expected.items() if not EXPERT_KEY.match(k)},
                 str(ckpt.tag_dir / MODEL_STATES), ckpt.config_source)
    tick()
    if master_weights:
        yield _master_weights(ckpt, tick)
        return
    yield dense
    for moe_layer, layer in enumerate(sorted(per_layer)):  # every file is there: the manifest was checked
        experts: dict[str, torch.Tensor] = {}
        for e in range(cfg.num_local_experts):
            f = expert_file(ckpt.tag_dir, moe_layer, e)
            part = _load(f)
            want = {expert_key(layer, e, name) for name in EXPERT_PARAMS}
            if not isinstance(part, dict) or set(part) != want:
                got = sorted(part) if isinstance(part, dict) else type(part).__name__
                raise CheckpointError(f"{f}: expected keys {sorted(want)}, found {got}")
            experts.update(part)
            tick()
        check_shapes(experts, per_layer[layer], f"{ckpt.tag_dir} (layer {layer} expert files)", ckpt.config_source)
        yield experts


def n_files_to_read(ckpt: Checkpoint, master_weights: bool) -> int:
    if master_weights:
        return len(_optim_files(ckpt.tag_dir)) + 1
    return 1 + (ckpt.config.num_hidden_layers * ckpt.config.num_local_experts if ckpt.config.is_moe else 0)


# ---- the ZeRO-1/2 optimizer partitions: fp32 master weights and Adam moments --------------------------------

def _optim_files(tag_dir: Path) -> dict[int, Path]:
    """{rank: its ZeRO optimizer partition file} of a tag."""
    return {int(m[1]): p for p in tag_dir.iterdir() if (m := OPTIM_FILE.match(p.name)) and m[2] == "00"}


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """An expert parameter's name with its local id (as a ZeRO optimizer lists it) -> the global-id name."""
    m = EXPERT_KEY.match(name)
    return expert_key(int(m[1]), ep_rank * local_experts + int(m[2]), m[3]) if m else name


FP32 = "fp32"  # the master weights' key among the optimizer state keys ("exp_avg", "exp_avg_sq", ...)


class OptimizerPartitions:
    """Every rank's flat ZeRO-1/2 optimizer partitions of a tag, indexed by parameter (our names, global expert
    ids), so any parameter's fp32 master weights or optimizer state comes back whole, at any new layout.

    Each `[bf16_]zero_pp_rank_{r}` file holds, per parameter group, rank r's slice of the group's flat fp32
    buffer (`single_partition_of_fp32_groups`), the base optimizer's state for that slice (`exp_avg`, ... of the
    same length) and `param_slice_mappings` (name -> start, numel of the part of each parameter in that slice).
    Non-expert groups are partitioned over all ranks (partition id = r); MoE groups (`moe: True`) over the
    expert-data-parallel group: with DeepSpeed's default layout rank r is expert-parallel rank r % ep and
    expert-data-parallel rank r // ep, and its expert names carry LOCAL ids. Concatenating a parameter's parts in
    partition order gives it whole. Files are memory-mapped: a parameter's bytes are read when it is asked for.
    """

    def __init__(self, ckpt: Checkpoint, tick: Callable[[], object] = lambda: None) -> None:
        tag_dir = ckpt.tag_dir
        files = _optim_files(tag_dir)
        if not files:
            raise CheckpointError(f"{tag_dir}: no ZeRO-1/2 optimizer states "
                                  "([bf16_]zero_pp_rank_*_mp_rank_00_optim_states.pt) in this checkpoint")
        world = max(files) + 1
        missing = sorted(set(range(world)) - set(files))
        expected_world = ckpt.states.get("dp_world_size", world)
        if missing or len(files) != expected_world:
            absent = missing or list(range(len(files), expected_world))
            raise CheckpointError(f"{tag_dir}: optimizer state files of rank(s) {absent} missing "
                                  f"(dp_world_size {expected_world}, found {len(files)})")
        self.ckpt, self.world, self.ranks = ckpt, world, []
        self.expected = expected_shapes(ckpt.config)
        # name -> [(partition order, rank, group, start, numel)]
        self.index: dict[str, list[tuple[int, int, int, int, int]]] = {}
        needed = ("single_partition_of_fp32_groups", "param_slice_mappings", "partition_count", "base_optimizer_state")
        for r in range(world):
            osd = _load(files[r]).get("optimizer_state_dict", {})
            if not all(k in osd for k in needed):
                raise CheckpointError(f"{files[r]}: not a ZeRO-1/2 optimizer state (needs {list(needed)})")
            self.ranks.append(osd)
            groups = osd["base_optimizer_state"]["param_groups"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                order, ep = r, 1
                if groups[g].get("moe", False):
                    ep = world // int(osd["partition_count"][g])
                    order = r // ep
                for name, frag in mapping.items():
                    name = global_expert_name(name, r % ep, ckpt.config.num_local_experts // ep)
                    self.index.setdefault(name, []).append((order, r, g, frag.start, frag.numel))
            tick()
        unknown = sorted(set(self.index) - set(self.expected))
        if unknown:
            raise CheckpointError(f"{tag_dir}: optimizer states hold {unknown[0]!r}, which the model of "
                                  f"{ckpt.config_source} does not have: the config does not match the weights")

    def _flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        osd = self.ranks[rank]
        if key == FP32:
            return osd["single_partition_of_fp32_groups"][group]
        state = osd["base_optimizer_state"]["state"].get(group, {})
        if key not in state:
            raise CheckpointError(f"{_optim_files(self.ckpt.tag_dir)[rank]}: no optimizer state {key!r} for "
                                  f"parameter group {group} (found {sorted(state)})")
        return state[key]

    def full(self, name: str, key: str = FP32) -> torch.Tensor:
        """Parameter `name` (global id) whole, from every partition that holds part of it: fp32 master weights
        (`FP32`) or an optimizer state tensor such as "exp_avg"."""
        pieces = sorted(self.index.get(name, []))
        if not pieces:
            raise CheckpointError(f"{self.ckpt.tag_dir}: fp32 master weights of {name} not found in the optimizer "
                                  "states (frozen parameters are not supported)")
        flat = torch.cat([self._flat(r, g, key).narrow(0, start, numel) for _, r, g, start, numel in pieces])
        shape = self.expected[name]
        if flat.numel() != shape.numel():
            raise CheckpointError(f"{self.ckpt.tag_dir}: optimizer partitions of {name} hold {flat.numel()} "
                                  f"values, but {self.ckpt.config_source} expects shape {list(shape)}")
        return flat.view(shape)


def _master_weights(ckpt: Checkpoint, tick: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The fp32 master weights, reassembled from every rank's flat optimizer partitions."""
    parts = OptimizerPartitions(ckpt, tick)
    expected = parts.expected
    out = {name: parts.full(name).clone() for name in parts.index}
    if ckpt.config.tie_word_embeddings:  # one parameter, one optimizer entry: its other name is not listed
        for a, b in (("lm_head.weight", "wte.weight"), ("lm_head.weight", "embed_tokens.weight")):
            if a in expected and a not in out and b in out:
                out[a] = out[b]
    absent = sorted(set(expected) - set(out))
    if absent:
        raise CheckpointError(f"{ckpt.tag_dir}: fp32 master weights of {absent[:3]}{' ...' if len(absent) > 3 else ''} "
                              "not found in the optimizer states (frozen parameters are not supported)")
    return out


def load_state_dict(path: str | os.PathLike, tag: str | None = None,
                    config: ModelConfig | str | os.PathLike | None = None, master_weights: bool = False,
                    verify_checkpoint: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The consolidated state dict (our names, global expert ids) and config of a checkpoint, in memory."""
    ckpt = open_checkpoint(path, tag, config, verify_checkpoint)
    state: dict[str, torch.Tensor] = {}
    for chunk in iter_state_chunks(ckpt, master_weights):
        state.update(chunk)
    return ckpt.config, state
