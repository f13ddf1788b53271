# Kiln — the two commands are `make up` and `make test`. `make help` lists the rest.

CARGO_TARGET_DIR ?= $(or $(TMPDIR),/tmp)/kiln-target
export CARGO_TARGET_DIR

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# DATABASE_URL / REDIS_URL of the local servers, exported into a recipe line.
SERVICES_ENV = set -a; eval "$$(scripts/services.sh env)"; set +a

.DEFAULT_GOAL := help
.PHONY: help up down test bench build fmt lint

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  make %-6s %s\n", $$1, $$2 }'

up: ## Start the local stack (PostgreSQL, Redis, kiln-api :8080, kiln-gateway :8090, kiln-scheduler, kiln-billing, simulated GPU hosts); writes .kiln/env
	scripts/up.sh

down: ## Stop what `make up` started
	scripts/down.sh

test: ## Run every test (starts PostgreSQL and Redis; installs them and Chromium if missing)
	scripts/ensure-packages.sh all
	scripts/services.sh start
	$(SERVICES_ENV); \
	  export KILN_SCREENSHOT_DIR="$(CURDIR)/target/screenshots"; \
	  mkdir -p "$$KILN_SCREENSHOT_DIR"; \
	  cargo nextest run --workspace --no-fail-fast

# Silent recipe lines: stdout carries only kiln-bench's BENCH lines (everything else is stderr).
bench: ## Build release binaries and run kiln-bench (prints BENCH <name> <value> <unit> lines)
	@scripts/services.sh start
	@cargo build --release -p kiln-api -p kiln-scheduler -p kiln-agent -p kiln-gateway -p kiln-bench
	@scripts/build-images.sh >&2
	@$(SERVICES_ENV); \
	  KILN_API_BIN="$(CARGO_TARGET_DIR)/release/kiln-api" KILN_SCHEDULER_BIN="$(CARGO_TARGET_DIR)/release/kiln-scheduler" \
	  KILN_AGENT_BIN="$(CARGO_TARGET_DIR)/release/kiln-agent" KILN_GATEWAY_BIN="$(CARGO_TARGET_DIR)/release/kiln-gateway" \
	  "$(CARGO_TARGET_DIR)/release/kiln-bench" $(BENCH_ARGS)

build: ## Build the whole workspace (debug)
	cargo build --workspace --all-targets

fmt: ## Format the code
	cargo fmt --all

lint: ## Check formatting and run clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
