# Two commands a newcomer needs (see README):
#   make run    set up .venv and run the whole pipeline on the tiny preset and the default corpus
#   make test   set up .venv and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PRESET ?= tiny
TORCH_CPU ?= torch==2.13.0
export WANDB_MODE ?= offline
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: setup run test lint bench server worker deploy stop-server clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip

# torch first: keep a torch the venv already has (a GPU user's CUDA build), else take the CPU pin, so the
# package's loose `torch>=` requirement is satisfied and pip never pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -qq "$(TORCH_CPU)"
	$(BIN)/python -m pip install -qq -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/blt run --preset $(PRESET)

test: setup
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.run_all

# Prefect UI: a local server on 127.0.0.1, a process work pool, the deployments of prefect.yaml, a worker.
server: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/prefect_local.sh start

deploy: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/prefect_local.sh pool
	PATH=$(abspath $(BIN)):$$PATH bash scripts/prefect_local.sh deploy

worker: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/prefect_local.sh worker

stop-server:
	bash scripts/prefect_local.sh stop

clean:
	rm -rf runs .prefect-local
