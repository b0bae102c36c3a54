# bladeflow: every target sets itself up; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of torch lies on these machines' disk; installing it first keeps pip from pulling
# a multi-GB CUDA build to satisfy the `torch` extra's range.
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= dev,torch,tf,demo,ops,caffe

export BLADEFLOW_HOME ?= $(CURDIR)/.bladeflow
export MLFLOW_DISABLE_TELEMETRY = true
export DO_NOT_TRACK = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false

.PHONY: setup demo test test-slow test-all lint format clean help bench bench-serve up down reliability audit

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install bladeflow with the extras demo and tests need (idempotent)

demo: setup  ## optimize and register the demo model end to end, print the latency table
	$(BIN)/bladeflow demo

test: setup  ## the default test suite (no slow/gpu tests), well under 15 minutes on 2 cores
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: setup  ## the slow tests
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-all: setup  ## every test (GPU tests skip without a GPU)
	$(BIN)/python -m pytest -q

lint: setup  ## ruff (lint + format check), mypy, the layer rules and declared = imported dependencies
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python scripts/check_layers.py
	$(BIN)/deptry .

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

RELIABILITY_STAMP := $(VENV)/.reliability
RELIABILITY_OUT   := $(BLADEFLOW_HOME)/reliability.jsonl

$(RELIABILITY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS),reliability]"
	@touch $(RELIABILITY_STAMP)

reliability: $(RELIABILITY_STAMP)  ## faults, overload, fuzzing, soak and security on purpose; prints the table, updates docs/RELIABILITY.md
	@mkdir -p $(BLADEFLOW_HOME) && rm -f $(RELIABILITY_OUT)
	-BLADEFLOW_RELIABILITY_REPORT=$(RELIABILITY_OUT) $(BIN)/python -m pytest tests/reliability -m "not gpu" -q
	$(BIN)/python -m tests.reliability.report $(RELIABILITY_OUT) --doc docs/RELIABILITY.md

audit: $(RELIABILITY_STAMP)  ## known vulnerabilities in the installed dependencies (pip-audit)
	$(BIN)/python scripts/audit.py

up: setup  ## start S3 (SeaweedFS), MLflow server, Prefect server + worker; register the deployments
	$(BIN)/bladeflow up

down:  ## stop exactly what `make up` started
	$(BIN)/bladeflow down

bench: setup  ## MiniLM optimization bench: PyTorch eager vs ORT vs peer recipes vs bladeflow's choice
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.minilm

bench-serve: setup  ## serving load bench: mlflow models serve vs bladeflow serve (batching off/on) vs raw ORT
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.serve.run --seconds 3 --rounds 2

clean:  ## remove the venv and the local data folder
	rm -rf $(VENV) .bladeflow .pytest_cache .mypy_cache .ruff_cache
