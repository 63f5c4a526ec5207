"""Training with DeepSpeed, from one CPU process to a Slurm cluster.

    main(args)  = plan (validate everything, no processes touched) -> run lock and resume decision -> setup
                  (process group, model, engine, restore) -> loop (steps, eval, logging, checkpoints) -> final save.

    args         the flags (TrainArgs), the command line built from them, the checks of each flag alone
    ds_config    the DeepSpeed config: unknown keys refused, batch arithmetic, DeepSpeed's own validation
    plan         every check of flags, configs and data that needs no process group -> a frozen Plan
    resume       whether and from which tag the run resumes (decided before any process group), and the restore
    save         saving a running engine: the commit protocol, RNG streams and counters, pruning the run's chain
    distributed  Slurm's rank variables, the process group and its collective timeout, lost-peer errors
    engine       the model and DeepSpeed's engine
    step         one optimizer step and one evaluation (the global-batch data contract, non-finite steps)
    metrics      metrics.jsonl, W&B, run_args.json, MFU and memory peaks
    loop         main and the loop: signals, checkpoints, exit statuses
"""

from gptoss.errors import TrainError
from gptoss.train.args import TrainArgs, arg_parser, args_from_namespace
from gptoss.train.ds_config import DS_CONFIG_KEYS, GPTOSS_KEYS, load_ds_config
from gptoss.train.loop import EXIT_BAD_STEPS, EXIT_LOST_RANK, main
from gptoss.train.plan import Plan, plan_run
from gptoss.train.resume import Resume, decide_resume
from gptoss.train.step import my_rows

# build_engine and train_step are deliberately not here: to wrap them, patch gptoss.train.loop, where the loop
# looks them up (a patch of a re-export would change nothing).
__all__ = [
    "DS_CONFIG_KEYS", "EXIT_BAD_STEPS", "EXIT_LOST_RANK", "GPTOSS_KEYS", "Plan", "Resume", "TrainArgs", "TrainError",
    "arg_parser", "args_from_namespace", "decide_resume", "load_ds_config", "main", "my_rows", "plan_run",
]
