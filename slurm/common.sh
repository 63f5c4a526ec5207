# shellcheck shell=bash
# What slurm/train.sbatch and slurm/train_single.sbatch share; both source it once they have cd'd to the
# checkout (under sbatch a script runs from a copy in Slurm's spool dir, so they find this file through
# REPO_DIR, not through $0). It owns the settings every job reads (PYTHON, RESUME, REQUEUE_ON_SIGNAL,
# MAX_REQUEUES, TORCH_ELASTIC_SHUTDOWN_TIMEOUT, DS_ACCELERATOR without a GPU), GPU detection, the threads per
# rank, the training arguments (the run dir from --out, --resume when it holds a checkpoint), and the job's
# life cycle: the training step run in the background, the time-limit warning (USR1) forwarded to it, and
# the requeue once it has saved. The scripts keep what differs: the default DS_CONFIG, how they count the
# ranks per node, the job's first log line, and the launch line with its node/rank wiring.
# The variables are documented in the scripts' headers and in slurm/README.md.

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
RESUME=${RESUME:-auto}
REQUEUE_ON_SIGNAL=${REQUEUE_ON_SIGNAL:-1}
MAX_REQUEUES=${MAX_REQUEUES:-20}
# On TERM, torch.distributed.run passes it on to its ranks and SIGKILLs them after this many seconds (default
# 30): give a rank time to finish its checkpoint, so that Slurm's own KillWait/GraceTime is the limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}

# A requeued attempt runs with its submission's environment, but the job may have been resized while it was held
# (scontrol update JobId=J NumTasks=N TasksPerNode=M, e.g. after losing GPUs): take its current task counts, so
# srun starts that many ranks and train.py resumes the checkpoint at the new world size.
if ((${SLURM_RESTART_COUNT:-0} > 0)) && [[ -n "${SLURM_JOB_ID:-}" ]]; then
  job_record=$(scontrol show job --oneliner "$SLURM_JOB_ID" 2>/dev/null || true)
  if [[ $job_record =~ NumTasks=([0-9]+) ]]; then
    export SLURM_NTASKS=${BASH_REMATCH[1]} SLURM_NPROCS=${BASH_REMATCH[1]}
  fi
  if [[ $job_record =~ NtasksPerN:B:S:C=([1-9][0-9]*): ]]; then export SLURM_NTASKS_PER_NODE=${BASH_REMATCH[1]}; fi
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
detect_gpus() {
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
  elif has_gpu; then nvidia-smi -L | grep -c '^GPU'
  else echo 1
  fi
}
has_gpu || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

# Stops the job (exit 2) before anything starts when GPUS_PER_NODE is not a count of ranks.
require_positive_gpus_per_node() {
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] && return 0
  echo "error: GPUS_PER_NODE must be a positive integer, not '$GPUS_PER_NODE'" >&2
  exit 2
}

# OMP_NUM_THREADS default: a node's CPUs ($1) shared among its GPUS_PER_NODE ranks, at least 1.
export_omp_threads_per_rank() {
  local threads=$(($1 / GPUS_PER_NODE))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads >= 1 ? threads : 1))}
}

# Sets train_args: --ds_config DS_CONFIG, the script's arguments ("$@"), and --resume per RESUME. The run dir
# is found as train.py will see it (its --out default is runs/nano), to look there for an earlier checkpoint.
build_train_args() {
  local out_dir=runs/nano prev="" arg
  for arg in "$@"; do
    case $arg in --out=*) out_dir=${arg#--out=} ;; esac
    [[ $prev == --out ]] && out_dir=$arg
    prev=$arg
  done
  train_args=(--ds_config "$DS_CONFIG" "$@")
  if [[ $RESUME == 1 || ($RESUME == auto && -f $out_dir/checkpoints/latest) ]] && [[ " $* " != *" --resume "* ]]; then
    train_args+=(--resume)
  fi
}

# The attempt's first log lines: the job, what the script's arguments ("$@") say about its shape, the command.
log_job_start() {
  echo "[gptoss] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" "$@"
  echo "[gptoss] $PYTHON launch/train.py ${train_args[*]}"
}

# The signal handling: Slurm's warning (USR1) reaches only this shell, so forward it to srun, which passes
# it to every process of the step; the ranks then save a checkpoint and exit. A TERM (scancel, preemption)
# already goes to every process, so it is only noted here, and the shell keeps waiting for the ranks.
got_signal=""
# shellcheck disable=SC2317  # invoked by the traps in run_training_step
on_signal() {
  got_signal=$1
  echo "[gptoss] caught SIG$1 at $(date +%T)" >&2
  [[ $1 == USR1 && -n "${srun_pid:-}" ]] && kill -USR1 "$srun_pid" 2>/dev/null
  return 0
}

# Runs the training step (the srun command line "$@") in the background with the traps above installed and
# waits for it to end; sets step_status to its exit status.
run_training_step() {
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  "$@" &
  srun_pid=$!
  # `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until srun has exited.
  while :; do
    step_status=0
    wait "$srun_pid" || step_status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  echo "[gptoss] training step exited with status $step_status"
}

# After the time-limit warning the ranks have saved: put the job back in the queue (REQUEUE_ON_SIGNAL,
# MAX_REQUEUES) so that its next attempt resumes from that checkpoint.
requeue_if_warned() {
  if [[ $got_signal == USR1 && $REQUEUE_ON_SIGNAL == 1 ]]; then
    if ((${SLURM_RESTART_COUNT:-0} < MAX_REQUEUES)); then
      echo "[gptoss] requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "[gptoss] not requeueing: already restarted $SLURM_RESTART_COUNT times (MAX_REQUEUES=$MAX_REQUEUES)" >&2
    fi
  fi
}
