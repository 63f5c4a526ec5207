"""The file that validates a DeepSpeed config: the `gptoss` section split off, unknown keys refused with a
did-you-mean (DeepSpeed silently ignores a misspelt top-level key), keys DeepSpeed reads but a gptoss run would
ignore refused with what to use instead, the global-batch arithmetic, DeepSpeed's own validation of every section
run before any process group exists, and the LR schedule's length set from the run's step count. Apart from the
planner because it is all about one file format and DeepSpeed's models of it."""

from __future__ import annotations

import copy
import difflib
import logging
import typing
from typing import Any

from gptoss.config import ConfigError, read_json_object
from gptoss.errors import TrainError

log = logging.getLogger(__name__)

# Every top-level key DeepSpeed 0.19 reads (DeepSpeedConfig and deepspeed.initialize; tests/system/test_faults.py
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

# Keys DeepSpeed reads (so they are in DS_CONFIG_KEYS) that change nothing in a gptoss run, or stop it, as
# deepspeed.initialize(model, model_parameters, config) is called here: we refuse them too, each with what to
# use instead. Found by reading DeepSpeed 0.19's engine for where each section takes effect.
IGNORED_DS_KEYS: dict[str, str] = {
    "activation_checkpointing": "it only configures deepspeed.checkpointing, which gptoss models never call; "
                                "use train.py --activation_checkpointing",
    "compile": "only engine.compile() reads it, and train.py never calls that; use train.py --compile",
    "pipeline": "only DeepSpeed's PipelineEngine reads it (for a PipelineModule); gptoss models are not pipelined",
    "dataloader_drop_last": "only DeepSpeed's own data loader reads it (deepspeed.initialize(training_data=...)); "
                            "gptoss feeds its BatchSampler's windows, which never have a short batch",
    "data_efficiency": "its data sampling and curriculum work through DeepSpeed's own data loader and its "
                       "random-LTD through layers converted by convert_to_random_ltd; gptoss uses neither",
    "weight_quantization": "only ZeRO-3's zero.Init reads it; gptoss trains with ZeRO-1/2",
    "hybrid_engine": "its inference kernels serve engine.generate() for RLHF, which train.py never calls; sample "
                     "with launch/sample.py",
    "autotuning": "the engine exits the process after the profiling steps (it is meant for `deepspeed "
                  "--autotuning`, whose configs set gradient_accumulation_steps, refused here); tune "
                  "train_micro_batch_size_per_gpu by hand",
    "use_data_before_expert_parallelism": "it builds the expert-parallel groups across data-parallel ranks "
                                          "([0, 2], [1, 3] on 4 ranks with ep_size 2) while gptoss's MoE layer "
                                          "holds the experts of rank % ep_size (DeepSpeed's default groups); "
                                          "remove the key",
    "vocabulary_size": "DeepSpeed only warns when it is not a multiple of 8; the vocabulary is the model "
                       "config's (--model)",
}


def load_ds_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed config, gptoss section). Keys starting with `_` are comments and are dropped."""
    try:
        raw = read_json_object(path)
    except ConfigError as e:
        raise TrainError(f"--ds_config {e}") from e
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    ours = ds.pop("gptoss", {})
    if not isinstance(ours, dict):
        raise TrainError(f"--ds_config {path}: 'gptoss' must be an object like {{\"ep_size\": 8}}")
    _refuse_unknown(set(ours) - GPTOSS_KEYS, GPTOSS_KEYS, f"--ds_config {path}: unknown key(s) in the 'gptoss' "
                    "section", f"known: {', '.join(sorted(GPTOSS_KEYS))}")
    _refuse_unknown(set(ds) - DS_CONFIG_KEYS, DS_CONFIG_KEYS, f"--ds_config {path}: unknown DeepSpeed "
                    "key(s)", "DeepSpeed would silently ignore them; fix the name, or prefix it with '_' to keep it "
                    "as a comment")
    ignored = sorted(set(ds) & set(IGNORED_DS_KEYS))
    if ignored:
        raise TrainError(f"--ds_config {path}: " + "; ".join(
            f"DeepSpeed key '{k}' does not work with train.py: {IGNORED_DS_KEYS[k]}" for k in ignored))
    return ds, ours


def _closest(key: str, known: set[str] | frozenset[str]) -> str | None:
    """The known key a typo most likely meant, if any is close enough."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _refuse_unknown(unknown: set[str], known: frozenset[str], what: str, fix: str) -> None:
    """One line naming each unknown key, with the closest known one where there is one."""
    if unknown:
        named = [f"'{k}'" + (f" (did you mean '{c}'?)" if (c := _closest(k, known)) else "") for k in sorted(unknown)]
        raise TrainError(f"{what}: {', '.join(named)}; {fix}")

def check_batch(ds: dict[str, Any], path: str, world: int) -> tuple[int, int, int]:
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


def check_with_deepspeed(ds: dict[str, Any], path: str, micro: int, accum: int) -> None:
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


def set_schedule_length(ds: dict[str, Any], total_steps: int) -> None:
    """Warmup-then-decay schedules end at `total_num_steps`: the run's step count, whatever the config says."""
    sched = ds.get("scheduler")
    if not sched or sched.get("type") not in ("WarmupCosineLR", "WarmupDecayLR"):
        return
    params = sched.setdefault("params", {})
    params["total_num_steps"] = total_steps
    warmup = params.get("warmup_num_steps", 1000)
    if warmup >= total_steps:
        log.warning("warmup_num_steps=%d >= total steps %d: the LR never decays", warmup, total_steps)
