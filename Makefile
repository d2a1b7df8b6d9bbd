# The project's commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install engine dev services test check lint typecheck migrations-check format bench bench-real faults clean gpu-%

help: ## List the commands
	@grep -hE '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,tools,local]'
	@# The tooling packages (nvidia_triton/: devstack, localtriton, gpuhost) are importable in the venv.
	@echo "$(CURDIR)/nvidia_triton" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llmq-tools.pth"
	@touch $(STAMP)

install: $(STAMP) ## Create the virtualenv (.venv) and install the project with its dev, tools and local extras

engine: $(STAMP) ## Install the real vLLM engine (own virtualenv in ~/.cache/llmq) and SmolLM2-135M-Instruct: ~700 MB, ~2 min, once
	$(BIN)/python -m localtriton.engine_env install

dev: $(STAMP) ## Run everything locally (API on :8887): SmolLM2 on the real vLLM engine + simulated models; LLMQ_LIGHT=1: simulated only
	$(BIN)/python -m devstack up

services: $(STAMP) ## Make sure Postgres and Redis run, create and migrate the database
	$(BIN)/python -m devstack services

test: $(STAMP) ## Run the test suite (unit + integration against real Postgres, Redis, Celery, Triton, the real vLLM engine)
	$(BIN)/python -m devstack services
	@if [ "$(LLMQ_SKIP_REAL_ENGINE)" != "1" ]; then $(BIN)/python -m localtriton.engine_env install --quiet; fi
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint typecheck migrations-check ## Ruff, mypy (strict) and `alembic check`

lint: $(STAMP) ## Ruff lint (everything) and format check (app, worker, migrations)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app worker migrations

typecheck: $(STAMP) ## mypy --strict (app, worker, nvidia_triton, bench)
	$(BIN)/mypy

migrations-check: $(STAMP) ## Fail when the models changed without a migration
	$(BIN)/python -m devstack services
	$(BIN)/alembic check

format: $(STAMP) ## Apply ruff's fixes and formatting (app, worker, migrations)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format app worker migrations

bench: $(STAMP) ## Throughput benchmark: direct Triton vs through the platform (see bench/README.md)
	$(BIN)/python -m bench $(BENCH_ARGS)

faults: $(STAMP) ## Fault suite: own Postgres/Redis, Triton, workers, API; kills and outages under load (~10 min; FAULTS_ARGS=--quick: ~3 min)
	$(BIN)/python -m bench.faults $(FAULTS_ARGS)

bench-real: engine ## The real model: direct through Triton vs the platform, tokens/s at 1, 16, 32 jobs
	$(BIN)/python -m bench.real_engine $(BENCH_ARGS)

gpu-%: ## GPU host targets, e.g. `make gpu-search-instance` (see nvidia_triton/Makefile, `make -C nvidia_triton help`)
	$(MAKE) -C nvidia_triton $*

clean: ## Remove the virtualenv and run files
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
