"""Training driver: DeepSpeed engine setup, the loop, evaluation, metrics.jsonl, checkpoint/resume, signals.

    main(args)  = plan (validate everything, no processes touched) -> setup (process group, model, engine,
                  resume) -> loop (steps, eval, logging, checkpoints) -> final checkpoint.

Data: one global batch of `train_batch_size` windows per optimizer step, drawn by a `BatchSampler` with
rank 0 / world 1, so the stream depends only on (seed, step); rank r trains rows
[r * micro * accum, (r + 1) * micro * accum) of it as `accum` micro-batches. A run on 1 or 64 ranks with
the same DeepSpeed config therefore sees the same data and the same LR schedule, and follows the same
trajectory up to float rounding.

Non-finite steps: DeepSpeed's ZeRO-1/2 optimizer computes the global gradient norm inside `engine.step()`
and, when it is inf/NaN (fp32 always, bf16 with `check_grad_overflow`, the default), zeroes the gradients
and skips the update and the LR-schedule step (`engine.was_step_applied()` is False). A non-finite loss
is backpropagated multiplied by NaN, so its gradients are NaN on purpose and the same skip follows on every
rank (the norm is global). The trainer only counts skipped steps and stops after `max_bad_steps` in a row;
the weights then still are those of the last good step, and that is what the final checkpoint holds.
ZeRO stage 0 is refused because its plain optimizer would apply NaN gradients.

Checkpoint layout (`<out>/checkpoints/`):
    latest                       the tag of the newest complete checkpoint (written last, atomically)
    step00000100/                one tag per save, `step{N:08d}`; DeepSpeed's own files, plus
        rank{r}_state.pt         per rank: RNG states (python, numpy, torch, accelerator), sampler, step
        train_state.json         rank 0: step, tokens, train_seconds, model_config, world/ep/batch layout
                                 (no torch needed)
A save writes every file, flushes them to disk, then writes train_state.json and renames `latest` into place;
a crash before that rename leaves `latest` on the previous checkpoint. `--resume` reads `latest` only, a
half-written tag dir is cleared when that step is saved again, and pruning never deletes what `latest` names.

Faults: flags, configs (unknown DeepSpeed keys included), data and checkpoint are checked before any process
group exists (exit 2, one line). A batch with an id outside the vocabulary is refused (exit 2). A rank that
dies or hangs makes the others fail within --timeout_min (exit 4, one line naming the checkpoint to resume);
that timeout covers DeepSpeed's own process groups too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss.config import ModelConfig, flops_per_token, get_config, read_json_object
from gptoss.data import BatchSampler, DataError, TokenDataset, eval_batches
from gptoss.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("gptoss.train")

CHECKPOINT_FORMAT = 1
# Dense bf16 tensor-core peaks, for MFU (matched against the accelerator's name).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A40": 149.7e12}
EXIT_BAD_STEPS = 3
EXIT_LOST_RANK = 4
# Every top-level key DeepSpeed 0.19 reads (DeepSpeedConfig and deepspeed.initialize; tests/test_faults.py
# re-derives the set from the installed DeepSpeed). DeepSpeed silently ignores any other key, so a typo such
# as "train_batch_szie" would quietly train with a default; we refuse it instead.
DS_CONFIG_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_parallel_size", "data_types", "dataloader_drop_last",
    "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity",
    "expert_parallel", "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op",
    "gradient_clipping", "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients",
    "progressive_layer_drop", "quantize_training", "scheduler", "seq_parallel_communication_data_type",
    "sequence_parallel_size", "sparse_attention", "sparse_gradients", "steps_per_print", "tensor_parallel",
    "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
})
GPTOSS_KEYS = frozenset({"ep_size"})  # the config's own "gptoss" section


class TrainError(UserError):
    """A user error found before training starts (flags, config, checkpoint); printed as one line."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainArgs:
    """Everything `launch/train.py` accepts; each field's help is the flag's `--help` text."""

    ds_config: str = _help("DeepSpeed JSON config (batch sizes, precision, ZeRO, optimizer, LR schedule)",
                           default="ds_configs/a40.json")
    model: str = _help("model preset (nano, tiny, gpt2-nano, ...) or a ModelConfig JSON file", default="nano")
    data: str = _help("prepared data dir (launch/prepare_data.py): train.bin, val.bin, meta.json",
                      default="data/tinystories")
    out: str = _help("run dir: metrics.jsonl, run_args.json, model_config.json, checkpoints/",
                     default="runs/nano")
    tokens: int | None = _help("train for this many tokens (steps = ceil(tokens / (train_batch_size x "
                               "seq_len))); exclusive with --max_steps", default=None)
    max_steps: int | None = _help("train for this many optimizer steps; exclusive with --tokens", default=None)
    seq_len: int = _help("tokens per training sequence (<= the model's max_position_embeddings)", default=1024)
    ep_size: int | None = _help("expert-parallel size: ranks sharing one copy of the experts (divides the "
                                "world size and the expert count); default: the config's gptoss.ep_size or 1",
                                default=None)
    seed: int = _help("seed of the weight init and the data order", default=0)
    attn_impl: str = _help("attention kernel: auto (FlexAttention on GPU, banded sliding window + SDPA on CPU), "
                           "flex, cpu (the banded/SDPA kernels on any device) or eager (reference)", default="auto")
    resume: bool = _help("continue from <out>/checkpoints/latest (same model, world size and batch layout)",
                         default=False)
    wandb: bool = _help("also log to Weights & Biases (WANDB_MODE=offline works without network)",
                        default=False)
    wandb_project: str = _help("W&B project name", default="gptoss")
    eval_every: int = _help("evaluate on the val split every N steps and at the end (0: never)", default=200)
    eval_batches: int = _help("micro-batches per evaluation (fixed windows; rounded up to a multiple of the "
                              "world size)", default=20)
    save_every: int = _help("checkpoint every N steps (0: only at the end); always saved at the end",
                            default=1000)
    keep_last: int = _help("keep the newest K checkpoints, delete older ones (0: keep all)", default=3)
    log_every: int = _help("write a metrics.jsonl record every N steps (and on eval steps and the last)",
                           default=10)
    max_bad_steps: int = _help("stop (exit 3, checkpoint of the last good state) after N consecutive "
                               "skipped steps with non-finite loss or gradient norm", default=5)
    timeout_min: float = _help("collective timeout in minutes: a dead or hung rank makes the others fail (exit 4) "
                               "instead of hanging", default=30.0)
    verify_data: bool = _help("before training, hash the data files against meta.json's sha256 and scan every "
                              "token id against the vocabulary (reads all the data; sizes and meta.json's "
                              "max_token_id are always checked)", default=False)


def arg_parser(description: str | None = None) -> Any:
    """The command line of `launch/train.py`: one flag per `TrainArgs` field, help from the field."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    types = {"int | None": int, "int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainArgs):
        help_text = f.metadata["help"]
        if f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            default = "" if f.default is None else " (default: %(default)s)"
            p.add_argument(f"--{f.name}", type=types[f.type], default=f.default, help=help_text + default,
                           metavar="N" if types[f.type] in (int, float) else f.name.upper())
    p.add_argument("--local_rank", type=int, default=None,
                   help="set by the deepspeed launcher; ignored (the LOCAL_RANK environment variable is used)")
    return p


def args_from_namespace(ns: Any) -> TrainArgs:
    return TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})


# ---------------------------------------------------------------------------------------------------------
# Plan: every check that needs no process group


@dataclass
class Plan:
    """The validated run: resolved DeepSpeed config, model config, layout and data."""

    args: TrainArgs
    ds_config: dict[str, Any]
    cfg: ModelConfig
    rank: int
    world_size: int
    ep_size: int
    micro: int  # train_micro_batch_size_per_gpu
    accum: int  # gradient accumulation steps, derived: train_batch_size / (micro x world)
    global_batch: int  # train_batch_size, sequences per optimizer step
    total_steps: int
    train_data: TokenDataset
    val_data: TokenDataset | None
    resume_tag: str | None  # checkpoint tag to load, when --resume

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.args.seq_len

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def load_ds_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed config, gptoss section). Keys starting with `_` are comments and are dropped."""
    raw = read_json_object(path, TrainError, f"--ds_config {path}")
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    ours = ds.pop("gptoss", {})
    if not isinstance(ours, dict):
        raise TrainError(f"--ds_config {path}: 'gptoss' must be an object like {{\"ep_size\": 8}}")
    _refuse_unknown(set(ours) - GPTOSS_KEYS, GPTOSS_KEYS, f"--ds_config {path}: unknown key(s) in the 'gptoss' "
                    "section", f"known: {', '.join(sorted(GPTOSS_KEYS))}")
    _refuse_unknown(set(ds) - DS_CONFIG_KEYS, DS_CONFIG_KEYS, f"--ds_config {path}: unknown DeepSpeed "
                    "key(s)", "DeepSpeed would silently ignore them; fix the name, or prefix it with '_' to keep it "
                    "as a comment")
    return ds, ours


def _closest(key: str, known: set[str] | frozenset[str]) -> str | None:
    """The known key a typo most likely meant, if any is close enough."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _refuse_unknown(unknown: set[str], known: frozenset[str], what: str, fix: str) -> None:
    """One line naming each unknown key, with the closest known one where there is one."""
    if not unknown:
        return
    named = []
    for key in sorted(unknown):
        close = _closest(key, known)
        named.append(f"'{key}'" + (f" (did you mean '{close}'?)" if close else ""))
    raise TrainError(f"{what}: {', '.join(named)}; {fix}")


def _env_int(name: str, default: int | str) -> int:
    return int(os.environ.get(name, default))


def _check_args(a: TrainArgs) -> None:
    if (a.tokens is None) == (a.max_steps is None):
        raise TrainError("pass exactly one of --tokens N or --max_steps N (the LR schedule length follows from it)")
    for name, low in (("tokens", 1), ("max_steps", 1), ("seq_len", 1), ("eval_every", 0), ("eval_batches", 1),
                      ("save_every", 0), ("keep_last", 0), ("log_every", 1), ("max_bad_steps", 1), ("seed", 0)):
        v = getattr(a, name)
        if v is not None and v < low:
            raise TrainError(f"--{name}={v}: must be >= {low}")
    if a.timeout_min <= 0:
        raise TrainError(f"--timeout_min={a.timeout_min}: must be > 0")
    from gptoss.model import ATTENTION_IMPLS

    if a.attn_impl not in ATTENTION_IMPLS:
        raise TrainError(f"--attn_impl={a.attn_impl}: expected one of {', '.join(ATTENTION_IMPLS)}")


def _check_batch(ds: dict[str, Any], path: str, world: int) -> tuple[int, int, int]:
    """(train_batch_size, micro, accum): the global batch must split evenly over micro-batches and ranks."""
    if "gradient_accumulation_steps" in ds:
        raise TrainError(f"{path}: remove gradient_accumulation_steps; it is derived as train_batch_size / "
                         "(train_micro_batch_size_per_gpu x world size), so the global batch stays fixed")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not isinstance(ds.get(key), int) or ds[key] < 1:
            raise TrainError(f"{path}: {key} must be a positive integer, got {ds.get(key)!r}")
    tbs, micro = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]
    if tbs % (micro * world):
        raise TrainError(f"{path}: train_batch_size={tbs} is not divisible by train_micro_batch_size_per_gpu="
                         f"{micro} x world size {world} = {micro * world}; make train_batch_size a multiple of "
                         f"{micro * world}, or change train_micro_batch_size_per_gpu or the number of ranks")
    return tbs, micro, tbs // (micro * world)


def _check_with_deepspeed(ds: dict[str, Any], path: str, micro: int, accum: int) -> None:
    """DeepSpeed's own validation of every section, before any process group: its models refuse unknown nested
    keys (e.g. zero_optimization.overlap_com), which would otherwise fail on every rank inside initialize."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from pydantic import ValidationError

    probe = copy.deepcopy({**ds, "train_batch_size": micro * accum})  # as one rank would see the same split
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(part) for part in err["loc"])
        section = _section_of(ds, loc, err.get("input"), unknown=err["type"] == "extra_forbidden")
        where = ".".join(((section,) if section else ()) + loc)
        if err["type"] == "extra_forbidden":
            model = _nested_model(_config_model(DeepSpeedConfigModel, e.title), loc[:-1])
            known = {f.alias or n for n, f in model.model_fields.items()} if model else set()
            close = _closest(loc[-1], known)
            hint = f"did you mean '{close}'?" if close else f"see {e.title} in DeepSpeed's config docs"
            raise TrainError(f"--ds_config {path}: unknown DeepSpeed key '{where}' ({hint})") from None
        raise TrainError(f"--ds_config {path}: {where}: {err['msg']} (got {err.get('input')!r})") from None
    except Exception as e:  # DeepSpeed's asserts, and type errors on a malformed section
        raise TrainError(f"--ds_config {path}: DeepSpeed rejects it: {e}") from None


def _section_of(ds: dict[str, Any], loc: tuple[str, ...], value: Any, unknown: bool) -> str | None:
    """The top-level section whose nested keys hold `loc` (with `value` there), e.g. 'bf16' for ('enabled',)."""
    for name, section in ds.items():
        node: Any = section
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            if unknown or node == value:
                return name
    return None


def _config_model(base: type, name: str) -> type | None:
    """The DeepSpeed config model class called `name` (pydantic errors carry only the class name)."""
    stack = [base]
    while stack:
        cls = stack.pop()
        if cls.__name__ == name:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def _nested_model(model: type | None, path: tuple[str, ...]) -> type | None:
    """Follow `path` through the model's fields (Optional/Union annotations included) to the innermost model."""
    import typing

    for part in path:
        if model is None:
            return None
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        candidates = [field.annotation] if field else []
        model = None
        while candidates:
            t = candidates.pop()
            if isinstance(t, type) and hasattr(t, "model_fields"):
                model = t
                break
            candidates.extend(typing.get_args(t))
    return model


def _set_schedule_length(ds: dict[str, Any], total_steps: int) -> None:
    sched = ds.get("scheduler")
    if not sched or sched.get("type") not in ("WarmupCosineLR", "WarmupDecayLR"):
        return
    params = sched.setdefault("params", {})
    params["total_num_steps"] = total_steps
    warmup = params.get("warmup_num_steps", 1000)
    if warmup >= total_steps:
        log.warning("warmup_num_steps=%d >= total steps %d: the LR never decays", warmup, total_steps)


def read_train_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path = ckpt_dir / tag / "train_state.json"
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found; {ckpt_dir / tag} is not a complete gptoss checkpoint")
    return json.loads(path.read_text())


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names: the only checkpoint known to be complete (a save that died never wrote it)."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise TrainError(f"{latest} is empty; write the tag of a complete checkpoint into it (a step* dir with "
                         "train_state.json) or choose another --out")
    return tag


def _check_resume(plan: Plan) -> None:
    a, ckpt_dir = plan.args, plan.ckpt_dir
    tag = latest_tag(ckpt_dir)
    if not a.resume:
        if tag is not None:
            raise TrainError(f"{a.out} already holds checkpoints (latest: {tag}); pass --resume to continue "
                             "that run or choose another --out")
        return
    if tag is None:
        raise TrainError(f"--resume: no checkpoint to resume in {ckpt_dir} (no 'latest' file); "
                         "drop --resume to start a new run")
    state = read_train_state(ckpt_dir, tag)
    mine = ckpt_dir / tag / f"rank{plan.rank}_state.pt"
    if state.get("world_size") == plan.world_size and not mine.is_file():
        raise TrainError(f"--resume: {mine} not found; {ckpt_dir / tag} is incomplete (copied partially?)")
    saved_cfg, cfg = state["model_config"], plan.cfg.to_dict()
    if saved_cfg != cfg:
        diff = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {cfg.get(k)!r}"
                         for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k))
        raise TrainError(f"--resume: checkpoint {tag} was trained with another model config ({diff}); "
                         f"use the same --model, or a new --out to start over")
    layout = {"world_size": plan.world_size, "ep_size": plan.ep_size, "train_batch_size": plan.global_batch,
              "seq_len": a.seq_len}
    changed = {k: (state[k], v) for k, v in layout.items() if state[k] != v}
    if changed:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        raise TrainError(f"--resume: checkpoint {tag} was written with another layout ({what}); resume with "
                         "the same number of ranks, --ep_size, train_batch_size and --seq_len "
                         "(ZeRO optimizer shards and the data stream depend on them)")
    plan.resume_tag = tag


def plan_run(args: TrainArgs) -> Plan:
    """Validate flags, configs, data and checkpoint before any process group or engine exists."""
    from gptoss.model import validate_parallelism

    _check_args(args)
    ds, ours = load_ds_config(args.ds_config)
    cfg = get_config(args.model)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    ep_size = args.ep_size if args.ep_size is not None else int(ours.get("ep_size", 1))
    if not cfg.is_moe and args.ep_size is None:
        ep_size = 1  # a config's ep_size means nothing for the dense baseline
    tbs, micro, accum = _check_batch(ds, args.ds_config, world)
    _check_with_deepspeed(ds, args.ds_config, micro, accum)  # section types too, before reading any of them
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    validate_parallelism(cfg, world_size=world, ep_size=ep_size, zero_stage=zero)
    if zero not in (1, 2):
        raise TrainError(f"{args.ds_config}: zero_optimization.stage={zero}: use stage 1 or 2 (the ZeRO "
                         "optimizer skips steps with non-finite gradients; stage 1 costs nothing on one GPU)")
    if args.seq_len > cfg.max_position_embeddings:
        raise TrainError(f"--seq_len={args.seq_len} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    tokens_per_step = tbs * args.seq_len
    total = args.max_steps if args.max_steps is not None else math.ceil(args.tokens / tokens_per_step)
    _set_schedule_length(ds, total)
    train_data, val_data = open_data(args, cfg)
    plan = Plan(args, ds, cfg, rank, world, ep_size, micro, accum, tbs, total, train_data, val_data, None)
    _check_resume(plan)
    return plan


def open_data(args: TrainArgs, cfg: ModelConfig) -> tuple[TokenDataset, TokenDataset | None]:
    """Open the splits the run reads; cheap checks always (meta, sizes, vocab, max_token_id), the full sha256
    and token scan with --verify_data. Every rank checks for itself: a node may see a different copy."""
    train_data = TokenDataset(args.data, "train", seq_len=args.seq_len, vocab_size=cfg.vocab_size)
    val_data = None
    if args.eval_every:
        try:
            val_data = TokenDataset(args.data, "val", seq_len=args.seq_len, vocab_size=cfg.vocab_size)
        except DataError as e:
            raise DataError(f"{e} (validation is on: --eval_every 0 trains without it)") from e
    if args.verify_data:
        for ds in (train_data, val_data):
            if ds is not None:
                t0 = time.perf_counter()
                ds.verify_checksum()
                ds.check_token_range(cfg.vocab_size)
                log.info("verified %s: sha256 matches meta.json, ids < %d (%.1fs)", ds.path, cfg.vocab_size,
                         time.perf_counter() - t0)
    return train_data, val_data


# ---------------------------------------------------------------------------------------------------------
# Setup: process group, model, engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adopt_slurm_env() -> None:
    """`srun python launch/train.py` (one task per GPU, no torchrun): take RANK etc. from Slurm's variables.

    MASTER_ADDR/MASTER_PORT still come from the batch script (the first node of the allocation).
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainError(f"started by srun with {os.environ['SLURM_NTASKS']} tasks but {missing} not set; export "
                         "them in the batch script (the first node and a free port), or launch with torchrun")
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))


def init_distributed(timeout_min: float) -> None:
    """Join (or, run as a plain `python` process, create) the process group, with a collective timeout.

    torch.distributed.run and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; alone we set a 1-rank
    group ourselves, since DeepSpeed would otherwise go looking for MPI.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if get_accelerator().device_name() == "cuda":
        get_accelerator().set_device(_env_int("LOCAL_RANK", 0))
    timeout = timedelta(minutes=timeout_min)
    # DeepSpeed builds its data/expert-parallel groups with new_group(ranks), which takes torch's 30-minute
    # default instead of the world group's timeout; ZeRO's gradient reduction and the MoE all-to-all run on
    # those groups, so without this a hung rank stalls the others for 30 minutes whatever --timeout_min says.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout, verbose=False)


def build_engine(plan: Plan) -> Any:
    """Model from the seed, then DeepSpeed's engine with our parameter groups (no decay on norms etc.)."""
    import deepspeed

    from gptoss.model import build_model, param_groups, set_attention_impl

    torch.manual_seed(plan.args.seed)
    model = build_model(plan.cfg, ep_size=plan.ep_size)
    set_attention_impl(model, plan.args.attn_impl)
    wd = float(plan.ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd), config=plan.ds_config)
    sched = engine.lr_scheduler
    if getattr(sched, "last_batch_iteration", None) == -1:
        # DeepSpeed's warmup schedules start at iteration -1, where the LR is 0: step 1 would be wasted.
        # Moving to iteration 0 makes step k use iteration k - 1 (warmup_min_ratio first, cos_min_ratio last).
        sched.step()
    return engine


# ---------------------------------------------------------------------------------------------------------
# State that travels with a checkpoint


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": acc.get_rng_state() if acc.device_name() == "cuda" else None}


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None and get_accelerator().device_name() == "cuda":
        get_accelerator().set_rng_state(state["accelerator"])


@dataclass
class Progress:
    """Loop counters that a checkpoint must restore."""

    step: int = 0  # optimizer steps taken (skipped ones included: their batch was consumed)
    bad_in_a_row: int = 0  # consecutive skipped steps
    skipped_total: int = 0
    train_seconds: float = 0.0  # wall-clock in training steps (evaluation and saving excluded), over resumes


def save_checkpoint(engine: Any, plan: Plan, sampler: BatchSampler, prog: Progress, reason: str) -> str:
    """All ranks: DeepSpeed's files, then one small file per rank, flushed to disk; then rank 0 commits `latest`.

    A crash anywhere before the commit leaves `latest` naming the previous checkpoint, and the half-written
    tag dir is never read (resume follows `latest` only); it is cleared when that step is saved again.
    """
    import torch.distributed as dist

    tag = f"step{prog.step:08d}"
    tag_dir = plan.ckpt_dir / tag
    if plan.rank == 0 and tag_dir.exists() and tag != latest_tag(plan.ckpt_dir):
        shutil.rmtree(tag_dir)  # the remains of a save that died: no stale file may survive into this one
    dist.barrier()
    state = {
        "format": CHECKPOINT_FORMAT,
        "tokens": prog.step * plan.tokens_per_step,
        "model_config": plan.cfg.to_dict(),
        "world_size": plan.world_size,
        "ep_size": plan.ep_size,
        "train_batch_size": plan.global_batch,
        "micro_batch_size": plan.micro,
        "seq_len": plan.args.seq_len,
        "seed": plan.args.seed,
        "total_steps": plan.total_steps,
        **dataclasses.asdict(prog),  # step, bad_in_a_row, skipped_total, train_seconds
        "reason": reason,  # "periodic", "final", "signal" or "non-finite"
        "sampler": sampler.state_dict(),
    }
    engine.save_checkpoint(str(plan.ckpt_dir), tag=tag, client_state=state, save_latest=False)
    # DeepSpeed's client_state is written by rank 0 only; RNG streams differ per rank.
    torch.save({"rng": rng_state(), "sampler": sampler.state_dict(), "step": prog.step},
               tag_dir / f"rank{plan.rank}_state.pt")
    dist.barrier()
    if _env_int("LOCAL_RANK", 0) == 0:  # one rank per node flushes what its node wrote
        _fsync_tree(tag_dir)
    dist.barrier()
    if plan.rank == 0:
        _atomic_write(tag_dir / "train_state.json", json.dumps(state, indent=2) + "\n")  # marks the dir complete
        _atomic_write(plan.ckpt_dir / "latest", tag)  # the commit
        prune_checkpoints(plan.ckpt_dir, plan.args.keep_last, keep=tag)
    dist.barrier()
    log.info("saved checkpoint %s (%s)", tag_dir, reason)
    return tag


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; durability is then theirs to give
        pass
    finally:
        os.close(fd)


def _fsync_tree(tag_dir: Path) -> None:
    """Flush a checkpoint's files to disk before `latest` names it: after a power loss, `latest` must not point
    at files that existed only in the page cache."""
    for f in tag_dir.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(tag_dir, directory=True)


def _atomic_write(path: Path, text: str) -> None:
    """Write then rename: a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def _tag_step(name: str) -> int | None:
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Keep `keep` (the tag `latest` names: never deleted) and the newest `keep_last - 1` complete checkpoints
    before it; delete older ones and the remains of saves that died (no train_state.json). Tags after `keep`
    (a run resumed from an older tag by hand) are left alone. keep_last 0 keeps everything."""
    keep_step = _tag_step(keep)
    if keep_last <= 0 or keep_step is None:
        return
    steps = {p: _tag_step(p.name) for p in ckpt_dir.glob("step*") if p.is_dir()}
    older = sorted((p for p, step in steps.items() if step is not None and step < keep_step), key=steps.get)
    complete = [p for p in older if (p / "train_state.json").is_file()]
    kept = {p.name for p in complete[-(keep_last - 1):]} if keep_last > 1 else set()
    for old in older:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, plan: Plan, sampler: BatchSampler) -> Progress:
    """Restore engine (weights, optimizer, LR schedule), sampler, RNG and counters from `plan.resume_tag`."""
    tag = plan.resume_tag
    path, client = engine.load_checkpoint(str(plan.ckpt_dir), tag=tag)
    if path is None:
        raise TrainError(f"--resume: DeepSpeed could not load {plan.ckpt_dir / tag}")
    rank_file = plan.ckpt_dir / tag / f"rank{plan.rank}_state.pt"
    mine = torch.load(rank_file, weights_only=False)  # our own file: python/numpy RNG states are pickles
    sampler.load_state_dict(mine["sampler"])
    set_rng_state(mine["rng"])
    # type(default) keeps ints ints; a field added later (train_seconds) starts at its default
    prog = Progress(**{f.name: type(f.default)(client.get(f.name, f.default)) for f in dataclasses.fields(Progress)})
    if engine.global_steps != prog.step or sampler.step != prog.step:
        raise TrainError(f"--resume: {tag} is inconsistent (engine step {engine.global_steps}, sampler step "
                         f"{sampler.step}, trainer step {prog.step})")
    log.info("resumed from %s at step %d", plan.ckpt_dir / tag, prog.step)
    return prog


# ---------------------------------------------------------------------------------------------------------
# One training step, evaluation


def my_rows(sampler: BatchSampler, plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of the next global batch; advances the sampler by one step."""
    starts = sampler.starts(sampler.step)  # the whole global batch's window starts
    sampler.step += 1
    per_rank = plan.micro * plan.accum
    mine = starts[plan.rank * per_rank:(plan.rank + 1) * per_rank]
    return [plan.train_data.batch(mine[i:i + plan.micro]) for i in range(0, per_rank, plan.micro)]


@dataclass
class StepStats:
    loss: float  # mean cross-entropy over the global batch
    aux_loss: float
    applied: bool  # False: DeepSpeed skipped the update (non-finite loss or gradient norm)
    stop: bool  # a rank received SIGTERM/SIGUSR1
    grad_norm: float | None
    expert_counts: list[list[float]] | None  # [layers][experts] assignments in this step, all ranks


def train_step(engine: Any, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], plan: Plan,
               stop_requested: bool) -> StepStats:
    """Forward/backward every micro-batch, one optimizer step, then one all-reduce of the step's stats."""
    import torch.distributed as dist

    dev = engine.device
    sums = torch.zeros(4, device=dev)  # loss, aux_loss, non-finite flag, stop flag
    counts = None
    nan = torch.tensor(float("nan"), device=dev)
    for x, y in micro_batches:
        out = engine(x.to(dev, non_blocking=True), targets=y.to(dev, non_blocking=True))
        loss = out.loss + out.aux_loss
        finite = torch.isfinite(loss)
        # A non-finite loss must not yield finite gradients: scale by NaN so DeepSpeed's overflow check skips.
        engine.backward(loss * torch.where(finite, 1.0, nan))
        engine.step()
        sums[0] += out.loss.detach().float()
        sums[1] += out.aux_loss.detach().float()
        sums[2] += (~finite).float()
        if out.expert_counts is not None:
            c = out.expert_counts.detach().float()
            counts = c if counts is None else counts + c
    sums[:2] /= len(micro_batches)
    sums[3] = float(stop_requested)
    packed = sums if counts is None else torch.cat([sums, counts.flatten()])
    dist.all_reduce(packed)
    vals = packed.tolist()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    applied = engine.was_step_applied() and vals[2] == 0
    expert = None
    if counts is not None:
        E = counts.shape[1]
        expert = [vals[4 + i * E: 4 + (i + 1) * E] for i in range(counts.shape[0])]
    return StepStats(loss=vals[0] / plan.world_size, aux_loss=vals[1] / plan.world_size, applied=applied,
                     stop=vals[3] > 0, grad_norm=grad_norm, expert_counts=expert)


@torch.no_grad()
def evaluate(engine: Any, plan: Plan) -> float:
    """Mean cross-entropy over fixed val windows, shared out over the ranks (equal forwards per rank, which
    expert parallelism needs), summed with one all-reduce."""
    import torch.distributed as dist

    n = math.ceil(plan.args.eval_batches / plan.world_size) * plan.world_size
    engine.eval()
    total = torch.zeros(2, device=engine.device)
    for x, y in eval_batches(plan.val_data, plan.micro, n, rank=plan.rank, world_size=plan.world_size):
        out = engine(x.to(engine.device), targets=y.to(engine.device))
        total[0] += out.loss.float()
        total[1] += 1
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------------------------------------------
# Metrics


def peak_flops() -> float | None:
    """Per-device dense bf16 peak of a known GPU, else None (no MFU on CPU or unknown devices)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_stats() -> dict[str, float | None]:
    """Peak accelerator memory allocated (GPU only) and peak host RSS, GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"mem_gpu_gib": gpu, "mem_rss_gib": round(rss, 3)}


class MetricsLog:
    """metrics.jsonl (rank 0) and optionally W&B; on resume, records past the checkpoint are dropped."""

    def __init__(self, plan: Plan, resume_step: int | None) -> None:
        self.path = plan.out / "metrics.jsonl"
        self.active = plan.rank == 0
        self.wandb = None
        if not self.active:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if plan.args.wandb:
            import wandb

            id_file = plan.out / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=plan.args.wandb_project, name=plan.out.name, id=run_id,
                                    resume="allow", dir=str(plan.out), config=run_args(plan))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}  # NaN/inf are not JSON: null
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list) and v is not None}
            for i, layer in enumerate(record.get("expert_load") or []):
                flat[f"expert_load_max/layer{i}"] = max(layer) * len(layer)
            self.wandb.log(flat, step=record["step"])

    def close(self, exit_code: int) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)  # W&B marks the run failed unless it is 0


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run_args(plan: Plan) -> dict[str, Any]:
    return {"args": dataclasses.asdict(plan.args), "world_size": plan.world_size, "ep_size": plan.ep_size,
            "train_batch_size": plan.global_batch, "micro_batch_size": plan.micro,
            "gradient_accumulation_steps": plan.accum, "tokens_per_step": plan.tokens_per_step,
            "total_steps": plan.total_steps, "ds_config": plan.ds_config}


# ---------------------------------------------------------------------------------------------------------
# Signals


class StopFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, the ranks agree, a checkpoint is saved."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------------
# Main


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)  # every rank knows the same; rank 0 tells
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO dumps the whole config per rank


def main(args: TrainArgs) -> int:
    """Run training; returns the exit status (0 done or stopped by a signal, 2 user error, 3 non-finite, 4 a rank
    died or hung)."""
    _setup_logging(_env_int("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        adopt_slurm_env()
        plan = plan_run(args)
    except UserError as e:
        if _env_int("RANK", 0) == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return train(plan)
    except UserError as e:  # found after setup: a checkpoint that does not load, a corrupted batch
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if plan.world_size == 1 or not _is_comm_failure(e):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        try:
            tag = latest_tag(plan.ckpt_dir)
        except TrainError:
            tag = None
        print(f"train.py: error: rank {plan.rank} lost the other ranks ({first.strip()}): a rank died or hung "
              f"longer than --timeout_min={plan.args.timeout_min:g}; fix the cause and restart with --resume "
              f"(latest checkpoint: {tag or 'none'})", file=sys.stderr)
        # Exit now: tearing down a process group whose peer is gone can abort in C++ destructors (SIGABRT,
        # "terminate called without an active exception"), which would hide this exit status from Slurm.
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # a dead launcher can make the flush raise (broken pipe): exit 4 regardless
            os._exit(EXIT_LOST_RANK)


def _is_comm_failure(e: BaseException) -> bool:
    """A collective or the rendezvous failed: a peer died, hung past the timeout, or the network broke. Gloo
    reports these as plain RuntimeErrors, so its words are matched too."""
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    markers = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Timed out waiting")
    return isinstance(e, RuntimeError) and any(m in str(e) for m in markers)


def train(plan: Plan) -> int:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    args = plan.args
    init_distributed(args.timeout_min)
    engine = build_engine(plan)
    sampler = BatchSampler(plan.train_data, plan.global_batch, seed=args.seed)  # the global stream, see top
    prog = load_checkpoint(engine, plan, sampler) if plan.resume_tag else Progress()
    if plan.rank == 0:
        plan.out.mkdir(parents=True, exist_ok=True)
        plan.cfg.save(plan.out / "model_config.json")
        (plan.out / "run_args.json").write_text(json.dumps(run_args(plan), indent=2) + "\n")
    metrics = MetricsLog(plan, prog.step if plan.resume_tag else None)
    log.info("%d rank(s), ep_size %d, global batch %d x %d tokens = %d tokens/step (micro %d x accum %d), "
             "%d steps", plan.world_size, plan.ep_size, plan.global_batch, args.seq_len, plan.tokens_per_step,
             plan.micro, plan.accum, plan.total_steps)

    flops = flops_per_token(plan.cfg, args.seq_len)
    peak = peak_flops()
    stop = StopFlag()
    bar = tqdm(total=plan.total_steps, initial=prog.step, disable=plan.rank != 0, unit="step", dynamic_ncols=True)
    last_saved = prog.step if plan.resume_tag else -1
    window = (prog.step, prog.train_seconds)  # throughput is measured since the last logged record
    exit_code, reason = 0, "final"
    try:
        while prog.step < plan.total_steps:
            lr = engine.get_lr()[0]
            t0 = time.perf_counter()
            stats = train_step(engine, my_rows(sampler, plan), plan, stop.requested)
            prog.train_seconds += time.perf_counter() - t0
            prog.step += 1
            bar.update(1)
            if stats.applied:
                prog.bad_in_a_row = 0
            else:
                prog.bad_in_a_row += 1
                prog.skipped_total += 1
                log.warning("step %d skipped: non-finite loss %.4g or grad norm %s (%d in a row)",
                            prog.step, stats.loss, stats.grad_norm, prog.bad_in_a_row)
            last = prog.step == plan.total_steps
            base = {"step": prog.step, "tokens": prog.step * plan.tokens_per_step, "elapsed_s": prog.train_seconds}
            record = None
            if prog.step % args.log_every == 0 or last or not stats.applied:
                tps = (prog.step - window[0]) * plan.tokens_per_step / max(prog.train_seconds - window[1], 1e-9)
                record = {**base, "loss": stats.loss, "aux_loss": stats.aux_loss, "lr": lr,
                          "grad_norm": stats.grad_norm, "tokens_per_s": tps,
                          "mfu": flops * tps / (peak * plan.world_size) if peak else None,
                          "skipped": not stats.applied, "skipped_total": prog.skipped_total}
                if stats.expert_counts is not None:
                    record["expert_load"] = [[c / max(sum(layer), 1.0) for c in layer]
                                             for layer in stats.expert_counts]
                record.update(memory_stats())
                window = (prog.step, prog.train_seconds)
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}")
            if plan.val_data is not None and (prog.step % args.eval_every == 0 or last):
                val = evaluate(engine, plan)
                record = record or base
                record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
                log.info("step %d: val loss %.4f", prog.step, val)
            if record is not None:
                metrics.write(record)
            if prog.bad_in_a_row >= args.max_bad_steps:
                exit_code, reason = EXIT_BAD_STEPS, "non-finite"
                break
            if stats.stop:
                reason = "signal"
                break
            if args.save_every and prog.step % args.save_every == 0 and not last:
                save_checkpoint(engine, plan, sampler, prog, "periodic")
                last_saved = prog.step
        if last_saved != prog.step:
            save_checkpoint(engine, plan, sampler, prog, reason)
    except BaseException as e:
        exit_code = EXIT_USER_ERROR if isinstance(e, UserError) else 1
        raise
    finally:
        bar.close()
        stop.restore()
        metrics.close(exit_code)
    if exit_code == EXIT_BAD_STEPS and plan.rank == 0:
        print(f"train.py: stopped after {prog.bad_in_a_row} consecutive non-finite steps; the checkpoint at "
              f"step {prog.step} holds the weights of step {prog.step - prog.bad_in_a_row}", file=sys.stderr)
    elif reason == "signal":
        log.info("stopped by signal at step %d; resume with --resume", prog.step)
    dist.barrier()
    dist.destroy_process_group()
    return exit_code
