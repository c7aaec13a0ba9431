# segq: `make demo` and `make test` are the two commands; `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
# Two layers, so that each clone runs its own code and a second clone installs
# in seconds:
# - the locked dependencies (torch and its CUDA libraries: ~6 GB) are built
#   once per requirements.lock and Python version by pip, into
#   $(DEPS_ROOT)/py<version>-<hash of the lock>,
#   shared by every clone on the machine and never changed after;
# - the clone's own venv ($(VENV), inside the clone) holds only the editable
#   install of this clone, sees the shared dependencies through one .pth file
#   and gets copies of their command-line scripts pointed at its own python.
# pip's download cache (~/.cache/pip) is shared as usual.
DEPS_ROOT ?= $(HOME)/.cache/segq/deps
VENV ?= .venv
LOCK_SHA := $(shell cat requirements.lock requirements-nodeps.txt | sha256sum | cut -c1-16)
DEPS_KEY := $(shell $(PYTHON) -c 'import sys; print("py%d%d" % sys.version_info[:2])')-$(LOCK_SHA)
DEPS := $(DEPS_ROOT)/$(DEPS_KEY)
BIN := $(VENV)/bin
DEPS_BUILT := $(DEPS)/.complete
VENV_LINKED := $(VENV)/.deps-$(DEPS_KEY)

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  Environment: $(VENV) (this clone's), locked dependencies shared in $(DEPS)"

# Named by the lock's hash, so no prerequisite: a fresh clone's newer
# requirements.lock must not rebuild what another clone built from the same lock.
# flock: two clones installing at once build it once; the marker is written
# last, so an interrupted build is started over rather than used.
$(DEPS_BUILT):
	@mkdir -p $(DEPS_ROOT)
	flock $(DEPS).building bash -c '\
	  test -e $@ && exit 0; \
	  rm -rf $(DEPS) && $(PYTHON) -m venv $(DEPS) \
	  && $(DEPS)/bin/python -m pip install -q --upgrade "pip>=24" \
	  && $(DEPS)/bin/python -m pip install -q -r requirements.lock \
	  && SAM2_BUILD_CUDA=0 $(DEPS)/bin/python -m pip install -q --no-deps --no-build-isolation -r requirements-nodeps.txt \
	  && touch $@'

# A venv made by an older Makefile (or a symlink to the old shared one) is
# replaced; rm on a symlink removes the link, never what it points at.
$(VENV_LINKED): $(DEPS_BUILT)
	rm -rf $(VENV)
	$(PYTHON) -m venv --without-pip $(VENV)
	@echo "import site; site.addsitedir('$$($(DEPS)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
	  > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/segq-locked-deps.pth"
	@for script in $(DEPS)/bin/*; do \
	  name=$${script##*/}; \
	  case $$name in python*|activate*|Activate*) continue;; esac; \
	  [ -f "$$script" ] || continue; \
	  if head -n1 "$$script" | grep -q '^#!.*python'; then \
	    { echo "#!$(abspath $(BIN))/python"; tail -n +2 "$$script"; } > $(BIN)/$$name && chmod +x $(BIN)/$$name; \
	  else ln -sfn "$$script" $(BIN)/$$name; fi; \
	done
	@touch $@

# Editable: the clone's source is what runs; redone when the package list
# (pyproject.toml) or the venv changes.
$(VENV)/.segq-editable: pyproject.toml $(VENV_LINKED)
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

.PHONY: install
install: $(VENV)/.segq-editable ## This clone's own .venv with segq (editable); builds the shared locked dependencies if missing

.PHONY: services
services: ## Start PostgreSQL and Redis on loopback if they are down (tests need them)
	@bash .ci/start-services

.PHONY: demo
demo: install ## Boot segq embedded, segment a sample image through the queue, write demo-out/
	$(BIN)/segq demo --out demo-out

.PHONY: test
test: install services lint ## Lint, type-check and run the whole test suite
	$(BIN)/python -m pytest -q

# The edit-test loop: a few minutes on 2 cores. CI runs `make test`.
.PHONY: test-fast
test-fast: install services ## The tests that start no subprocess and build no model (not slow, not model)
	$(BIN)/python -m pytest -q -m "not slow and not model"

.PHONY: lint
lint: install ## ruff, mypy and the layer rules (import-linter's contracts in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPY_CACHE_DIR=$(HOME)/.cache/segq/mypy $(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: docs
docs: install ## Build the documentation (MkDocs, material) into site/, failing on a broken link or anchor
	$(BIN)/mkdocs build --strict --site-dir site

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

.PHONY: bench-waiting
bench-waiting: install services ## 500 requests waiting on a job (Prefer: wait): a plain GET beside them, threads, connections, CPU
	$(BIN)/python bench/waiting.py

.PHONY: bench-job-get
bench-job-get: install services ## GET of a finished 1,000-item job with polygons: the old path (validated) beside the spliced answer, 304 and a page
	$(BIN)/python bench/job_get.py

.PHONY: bench-latency
bench-latency: install services ## A warm one-item job with Prefer: wait: p50/p95/p99 end to end beside the engine and each worker stage (GrabCut, SAM ViT-B)
	$(BIN)/python bench/latency.py $(BENCH_LATENCY_ARGS)

.PHONY: bench-engine
bench-engine: install ## SAM encoder/decoder ms, the embedding cache's second item (same and another process), mask encoding; SAM 3's encoding and ms per later phrase
	$(BIN)/python bench/engine.py $(BENCH_ENGINE_ARGS)
	$(BIN)/python bench/engine_sam3.py

.PHONY: bench-engine-pipeline
bench-engine-pipeline: install services ## The embedding cache through segq serve + segq worker on Postgres, Redis and S3 (moto)
	$(BIN)/python bench/engine_pipeline.py

# Sized for a CPU; bench/gpu_run.sh passes a GPU's.
BENCH_THROUGHPUT_ARGS ?= --batches 1,2 --precisions fp32,bf16 --rounds 1 --items 2
.PHONY: bench-throughput
bench-throughput: install services ## SAM encoder images/s by batch, precision and compilation, and a `segq worker` end to end (CPU-sized; bench/gpu_run.sh on a GPU)
	$(BIN)/python bench/engine_throughput.py $(BENCH_THROUGHPUT_ARGS)

.PHONY: lock
lock: ## Re-resolve requirements.lock from pyproject.toml (needs network)
	rm -rf /tmp/segq-lock && $(PYTHON) -m venv /tmp/segq-lock
	/tmp/segq-lock/bin/pip install -q --upgrade pip setuptools
	/tmp/segq-lock/bin/pip install -q -e ".[sam,dev]"
	/tmp/segq-lock/bin/pip freeze --exclude-editable | grep -v '^segq' > requirements.lock
	@echo "requirements-nodeps.txt is kept by hand: its packages' needs belong in pyproject's extras"
