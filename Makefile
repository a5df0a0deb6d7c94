# ferroloop: every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
# Extra interpreters the conformance suite also runs on (asyncio changed there).
EXTRA_PYTHONS ?= 3.12 3.13

.PHONY: help install build-dev lint fmt test test-rust test-parity test-parity-extra \
        test-conformance test-conformance-extra test-extra test-servers bench bench-net demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-24s %s\n", $$1, $$2}'

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "maturin>=1.5,<2" pytest ruff

# The libraries the demo and the end-to-end tests use (main venv only), reinstalled when
# the list changes.
$(VENV)/.test-deps: tests/requirements-libraries.txt | $(VPY)
	$(VPY) -m pip install -q -r tests/requirements-libraries.txt
	touch $@

# The servers tests/test_libraries_db.py starts (PostgreSQL, Redis), installed from Debian when
# missing. Without root or apt-get it only says so (those tests then skip), except under CI.
test-servers:  ## install the PostgreSQL and Redis servers the database tests start (Debian)
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "test-servers:$$missing not installed (apt-get as root installs them):" \
	       "the database tests will skip"; \
	  [ -z "$$CI" ] || exit 1; exit 0; \
	fi; \
	echo "test-servers: installing$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null

install: $(VPY)  ## create .venv with maturin, pytest, ruff

build-dev: install  ## build the native module into .venv (release profile)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q

lint: install  ## cargo fmt --check, cargo clippy, ruff
	cargo fmt --check
	cargo clippy --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks examples
	$(VENV)/bin/ruff format --check python tests benchmarks examples

fmt: install  ## format Rust and Python sources
	cargo fmt
	$(VENV)/bin/ruff format python tests benchmarks examples

test-rust:  ## Rust unit tests
	cargo test -q --lib

test-parity: build-dev $(VENV)/.test-deps test-servers  ## behaviour tests, each on asyncio and on ferroloop
	$(VPY) -m pytest -q -p no:cacheprovider tests --ignore=tests/conformance

test-conformance: build-dev  ## CPython's test_asyncio against ferroloop (main Python)
	$(VPY) tests/conformance/run.py

# test-conformance-extra runs EXTRA_TARGETS once per extra interpreter, in its own venv (.venv-3.12...),
# so each version's module is built once.
EXTRA_TARGETS ?= test-conformance
test-conformance-extra:  ## the conformance suite on the other CPython versions
	@for v in $(EXTRA_PYTHONS); do \
	  py=$$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python3 2>/dev/null | sort -V | tail -1); \
	  if [ -z "$$py" ]; then echo "$(EXTRA_TARGETS): no Python $$v here, skipped"; continue; fi; \
	  $(MAKE) --no-print-directory PYTHON=$$py VENV=.venv-$$v $(EXTRA_TARGETS) || exit 1; \
	done

test-parity-extra:  ## the parity tests on the other CPython versions
	@$(MAKE) --no-print-directory EXTRA_TARGETS=test-parity test-conformance-extra

test-extra:  ## parity tests and conformance suite on the other CPython versions
	@$(MAKE) --no-print-directory EXTRA_TARGETS="test-parity test-conformance" test-conformance-extra

test: test-rust test-parity test-conformance test-extra  ## build, then run every test

bench: build-dev  ## side-by-side core-loop benchmarks: asyncio, uvloop, rloop, ferroloop
	$(VPY) -m pip install -q uvloop rloop matplotlib
	$(VPY) benchmarks/run.py

bench-net: build-dev  ## network benchmarks (echo, HTTP with wrk, idle memory), same loops
	$(VPY) -m pip install -q uvloop rloop
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || true
	$(VPY) benchmarks/net.py

demo: build-dev $(VENV)/.test-deps  ## build, then run the task-control walkthrough
	$(VPY) examples/task_control.py

clean:  ## remove build outputs and virtualenvs
	rm -rf target $(VENV) .venv-* python/ferroloop/*.so
