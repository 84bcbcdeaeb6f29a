# Self-documenting Makefile: `make help`.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# an older .venv may hold hydra-optuna-sweeper (Optuna 2), replaced by src/search
	$(PY) -m pip uninstall --quiet --yes hydra-optuna-sweeper 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev tools, search and MLflow

train: $(STAMP) ## Train TinySSD on bananas (more: make train ARGS="loss=focal trainer.max_epochs=5")
	$(PY) -m src.train $(ARGS)

test: $(STAMP) ## Run the fast test suite (what CI runs)
	$(PY) -m pytest -q $(ARGS)

test-full: $(STAMP) ## Run every test, including the slow ones
	$(PY) -m pytest -q -m "" $(ARGS)

lint: $(STAMP) ## Check lint and formatting with ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Format and auto-fix with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

LOGDIR ?= outputs
tensorboard: $(STAMP) ## Open TensorBoard on outputs/ (one run: make tensorboard LOGDIR=<run folder>)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean: ## Remove runs, logs and caches (keeps .venv and data/)
	rm -rf outputs/* .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

.PHONY: help install train test test-full lint format tensorboard clean
