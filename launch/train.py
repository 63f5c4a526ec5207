"""Train a GPT-OSS (or GPT-2 baseline) model with DeepSpeed; see gptoss/train/.

    deepspeed launch/train.py --ds_config ds_configs/a40.json --model nano --data data/tinystories \\
        --out runs/nano --tokens 500000000                                           # one or more GPUs
    python launch/train.py --ds_config ds_configs/cpu.json --model tiny --data data/synthetic \\
        --out runs/quickstart --max_steps 60 --seq_len 64                            # one process, CPU
    python -m torch.distributed.run --nproc_per_node 2 launch/train.py ...          # torchrun / Slurm

Exit status: 0 finished or stopped by SIGTERM/SIGUSR1 (checkpoint saved; continue with --resume),
2 invalid flags/config/data/checkpoint (one line on stderr), 3 stopped after --max_bad_steps
consecutive non-finite steps (checkpoint of the last good weights saved), 4 another rank died or hung
past --timeout_min (one line on stderr; restart with --resume from the last checkpoint).
"""

from __future__ import annotations

import sys

from gptoss.train import arg_parser, args_from_namespace, main

if __name__ == "__main__":
    sys.exit(main(args_from_namespace(arg_parser(__doc__).parse_args())))
