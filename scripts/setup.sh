#!/usr/bin/env bash
# Creates .venv with everything gptoss needs. Safe to re-run: a ready environment returns in seconds.
#   torch first (kept if already importable), then DeepSpeed without build isolation (with isolation pip
#   pulls a multi-GB CUDA torch into its build environment), then gptoss in editable mode with test extras.
# Options: --slurm also installs Debian's slurm-wlm and munge when missing (needs root; used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# Pinned like torch: resharding a resume reads DeepSpeed's ZeRO-1/2 optimizer layout (gptoss/train/reshard.py), so a
# new DeepSpeed is a decision (run `make test` with DEEPSPEED_SPEC=deepspeed==X), not a surprise on a fresh machine.
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
stamp="$VENV/.gptoss-setup"
want_slurm=0
[[ "${1:-}" == "--slurm" ]] && want_slurm=1

log() { printf '[setup] %s\n' "$*"; }
has_gpu() { { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } || [[ -e /dev/nvidia0 ]]; }
# `timeout` bounds DNS too (urlopen's timeout does not cover a dead resolver).
reachable() { timeout 10 "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
  "$1" >/dev/null 2>&1; }
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# DeepSpeed's setup.py probes every op of the accelerator it detects; on a machine whose torch sees a GPU but
# that has no CUDA toolkit (nvcc, CUDA_HOME) the CUDA probes raise MissingCUDAException and the install fails.
# gptoss's training path loads no DeepSpeed op, so install with the CPU op table and no op built: the package is
# the same pure-Python one, and at run time DeepSpeed still detects the GPU (DS_ACCELERATOR is not kept).
DEEPSPEED_INSTALL_ENV=(DS_ACCELERATOR=cpu DS_BUILD_OPS=0)
pipq() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || scripts/setup.sh -nt "$stamp" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    pipq --upgrade pip setuptools wheel
  fi
  # An installed torch is kept when it meets gptoss's floor (gptoss/__init__.py checks it on import).
  if "$VENV/bin/python" -c "import sys, torch; sys.path.insert(0, '.'); import gptoss" 2>/dev/null; then
    log "keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  else
    # Without a GPU take the CPU wheels (PyPI's default torch carries multi-GB CUDA libraries) from PyTorch's
    # CPU index when it answers; offline machines fall back to the configured index/find-links.
    # TORCH_INDEX_URL overrides the choice.
    chosen_cpu_index=0
    if [[ -z "${TORCH_INDEX_URL:-}" ]] && ! has_gpu && reachable "$CPU_TORCH_INDEX"; then
      TORCH_INDEX_URL=$CPU_TORCH_INDEX
      chosen_cpu_index=1
      log "no GPU found: taking CPU-only torch wheels"
    fi
    log "installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    pipq "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    if [[ $chosen_cpu_index == 1 ]] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
      log "$CPU_TORCH_INDEX has no $TORCH_SPEC for this Python; trying the configured index"
      pipq "$TORCH_SPEC"
    fi
  fi
  if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
    log "installing $DEEPSPEED_SPEC (no build isolation, no ops built: no CUDA toolkit needed)"
    env "${DEEPSPEED_INSTALL_ENV[@]}" "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-build-isolation "$DEEPSPEED_SPEC"
  fi
  log "installing gptoss (editable) with test extras"
  pipq --no-build-isolation -e ".[test]"
  "$VENV/bin/python" -c "import torch, deepspeed, tiktoken, datasets, transformers" \
    || { echo "[setup] error: the environment in $VENV is incomplete (see pip output above)" >&2; exit 1; }
  touch "$stamp"
fi

if [[ $want_slurm == 1 ]] && ! command -v slurmctld >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing slurm-wlm and munge (for the Slurm test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null \
      || log "could not install Slurm; its test will be skipped"
  else
    log "Slurm not installed and not root: the Slurm test will be skipped"
  fi
fi
log "ready: $("$VENV/bin/python" -c 'from importlib.metadata import version as v; print("torch %s, deepspeed %s" % (v("torch"), v("deepspeed")))' 2>/dev/null)"
