"""Training with DeepSpeed, from one CPU process to a Slurm cluster.

    main(args)  = plan (validate everything, no processes touched) -> setup (process group, model, engine,
                  resume) -> loop (steps, eval, logging, checkpoints) -> final checkpoint.

    args         the flags (TrainArgs), the command line built from them, the checks of each flag alone
    ds_config    the DeepSpeed config: unknown keys refused, batch arithmetic, DeepSpeed's own validation
    plan         every check that needs no process group (flags, configs, data, checkpoint) -> Plan
    distributed  Slurm's rank variables, the process group and its collective timeout, lost-peer errors
    engine       the model and DeepSpeed's engine
    step         one optimizer step and one evaluation (the global-batch data contract, non-finite steps)
    metrics      metrics.jsonl, W&B, run_args.json, MFU and memory peaks
    loop         main and the loop: signals, checkpoints (gptoss.checkpoint), exit statuses
"""

from gptoss.checkpoint.layout import latest_tag
from gptoss.checkpoint.save import prune_checkpoints
from gptoss.errors import TrainError
from gptoss.train.args import TrainArgs, arg_parser, args_from_namespace
from gptoss.train.ds_config import DS_CONFIG_KEYS, GPTOSS_KEYS, load_ds_config
from gptoss.train.loop import EXIT_BAD_STEPS, EXIT_LOST_RANK, main
from gptoss.train.plan import Plan, plan_run
from gptoss.train.step import my_rows

# build_engine and train_step are deliberately not here: to wrap them, patch gptoss.train.loop, where the loop
# looks them up (a patch of a re-export would change nothing).
__all__ = [
    "DS_CONFIG_KEYS", "EXIT_BAD_STEPS", "EXIT_LOST_RANK", "GPTOSS_KEYS", "Plan", "TrainArgs", "TrainError",
    "arg_parser", "args_from_namespace", "latest_tag", "load_ds_config", "main", "my_rows", "plan_run",
    "prune_checkpoints",
]
