# The two commands a user needs: `make quickstart` and `make test`. Both set up what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, DeepSpeed runs on its CPU accelerator (gloo backend).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_GPU),1)
export DS_ACCELERATOR ?= cpu
endif
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: setup setup-slurm quickstart test test-fast lint gpu-check
setup:
	@scripts/setup.sh

setup-slurm:
	@scripts/setup.sh --slurm

lint: setup
	$(VENV)/bin/ruff check .

# Generate synthetic stories (gptoss's own grammar), train the tiny preset (~2.5 minutes on 2 CPU cores with the
# data vocabulary), print a story.
quickstart: setup
	$(PY) launch/prepare_data.py --synthetic 5000 --out data/synthetic
	rm -rf runs/quickstart
	$(PY) launch/train.py --ds_config ds_configs/cpu.json --model tiny --data data/synthetic --out runs/quickstart \
		--max_steps 1000 --seq_len 128 --eval_every 250 --eval_batches 8 --vocab data
	$(PY) launch/sample.py runs/quickstart --max_new_tokens 120

# Two pytest workers (pytest-xdist), each test module on one worker so module-scoped runs happen once: most tests
# are single-threaded subprocesses, so two of them share two cores well. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)
test: setup-slurm
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# One GPU check in one call (bench/gpu_check.py, at most ~8 minutes on one GPU): one markdown table in
# gpu_check.md. On a GPU machine without internet, carry gpu_kit/ (made by scripts/gpu_wheels.sh where pip reaches
# PyPI); it needs a Python with torch, transformers, tiktoken, safetensors and numpy, not this .venv.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) bench/gpu_check.py --out gpu_check.md
