# tgr-bench: `make smoke` (offline end-to-end run) and `make test` set up .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgr-bench-installed

.PHONY: help install smoke test lint clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install tgr-bench with its dev tools

smoke: $(STAMP)  ## offline smoke run: tiny random-weight timm models, synthetic images (CPU, seconds)
	$(BIN)/tgr-bench experiment=smoke

test: $(STAMP)  ## lint and the whole test suite (CPU only, no network)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

clean:  ## remove run outputs (not .venv)
	rm -rf outputs multirun build dist *.egg-info
