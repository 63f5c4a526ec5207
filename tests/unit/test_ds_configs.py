"""The shipped GPU configs start anywhere torch runs, and DeepSpeed keys that would do nothing are refused.

    start    ds_configs/a40.json and multinode.json through the real trainer (plan, engine, one bf16 ZeRO-2 step,
             final checkpoint) on CPU at world size 1: no DeepSpeed op is built or loaded (an empty
             TORCH_EXTENSIONS_DIR stays empty), the optimizer is torch's fused AdamW, gradients accumulate in fp32
    refused  DeepSpeed keys that DeepSpeed reads but that change nothing in a gptoss run (IGNORED_DS_KEYS): one
             line, exit 2, naming what to use instead
    flag     --activation_checkpointing reaches the engine's model and leaves the losses as they were
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, call_main, cpu_env, launch, ok, read_metrics, train_flags

from gptoss.train import DS_CONFIG_KEYS
from gptoss.train.ds_config import IGNORED_DS_KEYS

# Runs launch/train.py with two probes: every DeepSpeed op load is recorded, and the engine that build_engine
# returns is described, both into the JSON file $ENGINE_REPORT.
ENGINE_WRAPPER = """
import json, os, sys
from deepspeed.ops.op_builder.builder import OpBuilder
import gptoss.train.loop as t  # the loop looks build_engine up in its own module

report = {"op_loads": []}
load = OpBuilder.load
def recording_load(self, *args, **kwargs):
    report["op_loads"].append(self.name)
    if os.environ.get("REFUSE_OP_LOADS"):  # record, but neither build nor load (a control costs no compile)
        raise RuntimeError(f"probe: refused to load DeepSpeed op {self.name}")
    return load(self, *args, **kwargs)
OpBuilder.load = recording_load
build_engine = t.build_engine
def described(plan):
    engine = build_engine(plan)
    opt = engine.basic_optimizer
    report.update(basic_optimizer=f"{type(opt).__module__}.{type(opt).__qualname__}",
                  fused=opt.defaults.get("fused"), zero_optimizer=type(engine.optimizer).__name__,
                  grad_accum_dtype=str(getattr(engine.optimizer, "gradient_accumulation_dtype", None)),
                  comm_dtype=str(getattr(engine.optimizer, "communication_data_type", None)),
                  module_dtype=str(next(engine.module.parameters()).dtype),
                  accum=engine.gradient_accumulation_steps(),
                  activation_checkpointing=engine.module.options.activation_checkpointing)
    return engine
t.build_engine = described
from gptoss.train import arg_parser, args_from_namespace
try:
    code = t.main(args_from_namespace(arg_parser().parse_args()))
finally:
    with open(os.environ["ENGINE_REPORT"], "w") as f:
        json.dump(report, f)
sys.exit(code)
"""


def run_with_report(tmp_path: Path, flags: list[str], check: bool = True, **env: str) -> tuple[dict, Path]:
    """launch/train.py under ENGINE_WRAPPER; returns (report, run dir), after checking exit 0 if `check`."""
    wrapper = tmp_path / "engine_train.py"
    wrapper.write_text(ENGINE_WRAPPER)
    report = tmp_path / "engine.json"
    proc = launch(wrapper, *flags, env=cpu_env(ENGINE_REPORT=str(report), **env))
    if check:
        ok(proc)
    return json.loads(report.read_text()), Path(flags[flags.index("--out") + 1])


# ---- start -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ds_name, extra, accum", [
    ("a40.json", [], 4),  # as on one A40: 64 = 16 micro x 4
    ("multinode.json", ["--ep_size", "1"], 32),  # ep 8 needs 8 ranks; the batch arithmetic is one rank's
])
def test_shipped_gpu_configs_build_no_deepspeed_op(tiny_data, tmp_path, ds_name, extra, accum):
    """bf16 works on DeepSpeed's CPU accelerator, so the configs run as shipped: one real bf16 ZeRO-2 step with
    their optimizer and precision settings, in a fresh TORCH_EXTENSIONS_DIR that must stay empty (nor does the
    CPU accelerator's shared-memory all-reduce build: the trainer skips it, gptoss.train.distributed)."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    flags = train_flags(tiny_data, tmp_path / "run", "--eval_every", "0", "--save_every", "0", *extra, steps=1)
    flags[flags.index("--ds_config") + 1] = str(REPO / "ds_configs" / ds_name)
    report, out = run_with_report(tmp_path, flags, TORCH_EXTENSIONS_DIR=str(ext))
    assert report["op_loads"] == [] and list(ext.iterdir()) == []
    assert report["basic_optimizer"] == "torch.optim.adamw.AdamW" and report["fused"] is True
    assert report["zero_optimizer"] == "DeepSpeedZeroOptimizer" and report["accum"] == accum
    assert report["module_dtype"] == "torch.bfloat16" and report["grad_accum_dtype"] == "torch.float32"
    # the cross-rank gradient sum: fp32 at multinode scale (BENCHMARKS 12), the training dtype on one GPU
    assert report["comm_dtype"] == ("torch.float32" if ds_name == "multinode.json" else "torch.bfloat16")
    record = read_metrics(out)[1]
    assert not record["skipped"] and record["loss"] > 0 and record["grad_norm"] > 0
    assert (out / "checkpoints" / "latest").read_text() == "step00000001"


def test_the_probe_sees_an_op_load(tiny_data, tmp_path):
    """Control: the same probe on a config without torch_adam records DeepSpeed's FusedAdam op being loaded
    (refused by the probe, so nothing compiles and the run stops there)."""
    cfg = json.loads((REPO / "ds_configs" / "a40.json").read_text())
    for key in ("torch_adam", "fused"):
        del cfg["optimizer"]["params"][key]
    ds = tmp_path / "fused_adam.json"
    ds.write_text(json.dumps(cfg))
    flags = train_flags(tiny_data, tmp_path / "run", "--eval_every", "0", "--save_every", "0", steps=1)
    flags[flags.index("--ds_config") + 1] = str(ds)
    report, _ = run_with_report(tmp_path, flags, check=False, REFUSE_OP_LOADS="1")
    assert report["op_loads"] == ["fused_adam"]


# ---- refused -----------------------------------------------------------------------------------------------

def test_ignored_keys_are_keys_deepspeed_reads():
    """IGNORED_DS_KEYS is a subset of what DeepSpeed reads (test_faults re-derives that set from DeepSpeed), so
    each is refused for what it does, not as a typo."""
    assert set(IGNORED_DS_KEYS) <= DS_CONFIG_KEYS


@pytest.mark.parametrize("key, value, says", [
    ("activation_checkpointing", {"partition_activations": True}, "use train.py --activation_checkpointing"),
    ("compile", {"deepcompile": True}, "train.py never calls that; use train.py --compile"),
    ("pipeline", {"activation_checkpoint_interval": 1}, "only DeepSpeed's PipelineEngine reads it"),
    ("dataloader_drop_last", True, "only DeepSpeed's own data loader reads it"),
    ("data_efficiency", {"enabled": True}, "gptoss uses neither"),
    ("weight_quantization", {}, "only ZeRO-3's zero.Init reads it"),
    ("hybrid_engine", {"enabled": False}, "sample with launch/sample.py"),
    ("autotuning", {"enabled": False}, "the engine exits the process after the profiling steps"),
    ("vocabulary_size", 512, "the vocabulary is the model config's (--model)"),
    ("use_data_before_expert_parallelism", True, "holds the experts of rank % ep_size"),
])
def test_ignored_deepspeed_keys_are_refused_with_what_to_use(capsys, monkeypatch, tiny_data, tmp_path, key, value,
                                                             says):
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out", {key: value})
    assert f"DeepSpeed key '{key}' does not work with train.py: " in line and says in line, line


def test_every_ignored_key_is_named_in_one_line(capsys, monkeypatch, tiny_data, tmp_path):
    line = call_main(capsys, monkeypatch, tiny_data, tmp_path / "out",
                     {"pipeline": {}, "compile": {}, "activation_checkpointing": {}})
    assert [part.split("'")[1] for part in line.split("DeepSpeed key ")[1:]] == [
        "activation_checkpointing", "compile", "pipeline"]


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_use_none_of_them(path):
    from gptoss.train import load_ds_config

    ds, _ = load_ds_config(str(path))
    assert not set(ds) & set(IGNORED_DS_KEYS)


# ---- flag --------------------------------------------------------------------------------------------------

def test_activation_checkpointing_flag_reaches_the_engine_and_keeps_the_losses(tiny_data, tmp_path):
    """fp32 CPU runs: the same losses and gradient norms with the flag as without, and the engine's blocks are
    checkpointed only with it."""
    runs = {}
    for flag in ([], ["--activation_checkpointing"]):
        flags = train_flags(tiny_data, tmp_path / f"run{len(flag)}", "--eval_every", "0", "--save_every", "0",
                            *flag, steps=3)
        report, out = run_with_report(tmp_path, flags)
        assert report["activation_checkpointing"] is bool(flag)
        runs[bool(flag)] = read_metrics(out)
    for step in (1, 2, 3):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert runs[True][step][key] == pytest.approx(runs[False][step][key], rel=1e-6, abs=1e-7), (step, key)
