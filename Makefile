# segq: `make demo` and `make test` are the two commands; `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
# The environment lives outside the clone (torch and its CUDA libraries are
# ~6 GB), shared by every clone on this machine and rebuilt when the lock changes.
VENV ?= $(HOME)/.cache/segq/venv
BIN := $(VENV)/bin
LOCK_SHA := $(shell sha256sum requirements.lock | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_SHA)

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

.PHONY: install
install: $(STAMP) ## Install pinned dependencies and segq (editable) into $(VENV)
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@ln -sfn $(VENV) .venv

.PHONY: services
services: ## Start PostgreSQL and Redis on loopback if they are down (tests need them)
	@bash .ci/start-services

.PHONY: demo
demo: install ## Boot segq embedded, segment a sample image through the queue, write demo-out/
	$(BIN)/segq demo --out demo-out

.PHONY: test
test: install services lint ## Lint, type-check and run the whole test suite
	$(BIN)/python -m pytest -q

.PHONY: lint
lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPY_CACHE_DIR=$(HOME)/.cache/segq/mypy $(BIN)/mypy

.PHONY: format
format: install ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: bench-quality
bench-quality: install ## Mean IoU of the classical engine vs the filled box on the COCO sample
	$(BIN)/python bench/quality_grabcut.py

.PHONY: bench-ingest
bench-ingest: install services ## Items accepted/finished per second and per-item overhead vs a bare Celery round trip
	$(BIN)/python bench/ingest.py

.PHONY: lock
lock: ## Re-resolve requirements.lock from pyproject.toml (needs network)
	rm -rf /tmp/segq-lock && $(PYTHON) -m venv /tmp/segq-lock
	/tmp/segq-lock/bin/pip install -q --upgrade pip setuptools
	/tmp/segq-lock/bin/pip install -q -e ".[sam,dev]"
	/tmp/segq-lock/bin/pip freeze --exclude-editable | grep -v '^segq' > requirements.lock
