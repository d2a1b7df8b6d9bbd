# The project's commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install dev services test check lint typecheck migrations-check format bench clean gpu-%

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

dev: $(STAMP) ## Run everything locally: Postgres/Redis, migrations, local Triton, worker, API on :8887 (API_PORT)
	$(BIN)/python -m devstack up

services: $(STAMP) ## Make sure Postgres and Redis run, create and migrate the database
	$(BIN)/python -m devstack services

test: $(STAMP) ## Run the test suite (unit + integration against real Postgres, Redis, Celery, Triton)
	$(BIN)/python -m devstack services
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint typecheck migrations-check ## Ruff, mypy (strict) and `alembic check`

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app worker migrations

typecheck: $(STAMP)
	$(BIN)/mypy

migrations-check: $(STAMP) ## Fail when the models changed without a migration
	$(BIN)/python -m devstack services
	$(BIN)/alembic check

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format app worker migrations

bench: $(STAMP) ## Throughput benchmark: direct Triton vs through the platform (see bench/README.md)
	$(BIN)/python -m bench $(BENCH_ARGS)

gpu-%: ## GPU host targets, e.g. `make gpu-search-instance` (see nvidia_triton/Makefile, `make -C nvidia_triton help`)
	$(MAKE) -C nvidia_triton $*

clean: ## Remove the virtualenv and run files
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
