# The two commands a new user needs:  `make demo`  and  `make test`.  Both set up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Containers and CI machines run as root; OpenMPI refuses that unless told it is intended.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup setup-test test lint format demo bench weights compare clean help

help:
	@echo "make setup  - install apt packages, .venv with pinned requirements, Horovod, the kits-* commands (idempotent)"
	@echo "make test   - setup, then lint (ruff) and the full test suite (pytest)"
	@echo "make demo   - setup, then synthetic data -> preprocessing -> 2-rank training -> evaluation"
	@echo "make bench  - setup, then the benchmarks, JSON results in bench/results/"
	@echo "make weights MODEL=unet2d|unet3d - train (or continue) model_weights/MODEL, see scripts/train_weights.sh"
	@echo "make compare [QUICK=1] - train and evaluate all seven models on one budget, table in compare_runs/results.md, see scripts/compare_models.sh"
	@echo "make format - apply ruff formatting"

setup:
	@bash scripts/setup.sh

# the scheduler tests also need SLURM, munge, strace and shellcheck
setup-test:
	@KITS_SETUP_TEST=1 bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup-test lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	@bash scripts/demo.sh

bench: setup
	@bash scripts/bench.sh

weights: setup
	@MODEL=$(MODEL) bash scripts/train_weights.sh

compare: setup
	@bash scripts/compare_models.sh

clean:
	rm -rf demo_output bench/results/*.tmp .pytest_cache
