# Quick start:  make demo   (set up, then train DRDO on the embedded default)
#               make test   (set up, then run the test suite; CI runs this)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine install your torch first or pass TORCH=torch.
TORCH ?= torch==2.13.0
# DeepSpeed's C++ ops are built once per environment, inside it: a build killed elsewhere (which
# leaves torch's lock file behind, and every later build waiting on it) cannot stall this one.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup demo test embedded-default

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,deepspeed,bench,peft,trackers,embedded]"
	$(BIN)/python -m drdo_lightning.strategies.deepspeed
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m drdo_lightning fit --config configs/drdo.yaml

# One test process per core (at most 4: several tests start two processes of their own), one torch
# thread each: the tiny models gain nothing from more, and more threads than cores slow every process.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4
