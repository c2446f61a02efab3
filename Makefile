# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint typecheck unit services bench fuzz clean

$(VENV)/.stamp-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.stamp-demo: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[builder]'
	touch $@

demo: $(VENV)/.stamp-demo
	$(PY) -m edgepack.demo

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check edgepack device_agent

typecheck: $(VENV)/.stamp-dev
	$(VENV)/bin/mypy

# Debian's servers the end-to-end tests start on loopback (nginx); the emulated
# aarch64 root is prepared by the tests' own fixture (hw/emulation/aarch64.sh).
services:
	tests/setup/install-services.sh

unit: $(VENV)/.stamp-dev services
	$(VENV)/bin/pytest

test: lint typecheck unit

bench: $(VENV)/.stamp-dev
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Coverage-guided fuzzing of every parser of untrusted bytes (docs/fuzzing.md), one
# target after another; the growing corpora and any crash artifacts stay in .fuzz/.
FUZZ_SECONDS ?= 600
fuzz: $(VENV)/.stamp-dev
	$(PY) -m tests.fuzz.run --seconds $(FUZZ_SECONDS) --out .fuzz

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
