# imagenette_lab — `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The real 224 px archive on machines without internet; elsewhere empty, and the official archive is
# downloaded (data.variant). Override with `make train ARCHIVE=/path/to/imagenette2-320.tgz`.
ARCHIVE ?= $(wildcard ../shared/datasets/imagenette2-224.tgz)
DATA_ARGS := $(if $(ARCHIVE),data.archive=$(abspath $(ARCHIVE)))
# `make train PRESET=cpu|gpu` forces a preset; auto picks gpu when CUDA is visible.
PRESET ?= auto
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint train bench gpu-check clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Report experiments (make <name> [SCALE=full|cpu|quick] [SEEDS=1,2,3] [ARGS=...]):"
	@$(MAKE) --no-print-directory experiments-help

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install the package with dev tools (pip install -e .[dev])

test: install ## Run the whole test suite on real images (slow tests included; ~25 min on 2 cores)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install ## Run the tests not marked slow
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

lint: install ## Ruff lint
	$(VENV)/bin/ruff check .

train: install ## The main job: report recipe on a GPU; the reduced CPU preset otherwise (README)
	@preset=$(PRESET); if [ "$$preset" = auto ]; then \
	  preset=$$($(PY) -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")'); fi; \
	echo "make train: preset=$$preset"; \
	if [ "$$preset" = gpu ]; then $(PY) run.py trainer=gpu $(DATA_ARGS) $(ARGS); \
	else $(PY) run.py experiment=cpu_train $(DATA_ARGS) $(ARGS); fi

bench: install ## Benchmarks side by side (loader, train step, end to end, CPU training knobs) -> BENCHMARKS.md
	$(PY) benchmarks/bench.py $(DATA_ARGS) $(ARGS)

gpu-check: install ## GPU check (<= 8 min on one H200): bench GPU rows, one recipe epoch per model, peak memory -> BENCHMARKS.md
	$(PY) benchmarks/gpu_check.py $(if $(ARCHIVE),--archive $(abspath $(ARCHIVE))) $(ARGS)

include docs/makefile_experiments.mk

clean: ## Remove run outputs (logs/) and the data cache (data/); keeps .venv
	rm -rf logs data
