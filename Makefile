# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint typecheck unit services bench fuzz conformance clean

# constraints-dev.txt pins the whole dev environment to versions the suite was verified
# with, so a fresh machine tests what was tested (the registry moves on).
$(VENV)/.stamp-dev: pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $@

$(VENV)/.stamp-demo: pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[builder,fleet]'
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

# theupdateframework's tuf-conformance suite (not vendored) against the agent's TUF
# client, through tests/conformance/agent_client.py; needs a checkout and faketime:
#   make conformance TUF_CONFORMANCE_DIR=/path/to/tuf-conformance [CONFORMANCE_ARGS=-x]
conformance:
	@test -n "$(TUF_CONFORMANCE_DIR)" || { echo "make conformance: set TUF_CONFORMANCE_DIR to a tuf-conformance checkout (see docs/threat-model.md)" >&2; exit 1; }
	@$(MAKE) --no-print-directory $(VENV)/.stamp-dev
	cd "$(TUF_CONFORMANCE_DIR)" && "$(CURDIR)/$(VENV)/bin/pytest" tuf_conformance -p no:cacheprovider \
		--entrypoint "$(CURDIR)/$(PY) $(CURDIR)/tests/conformance/agent_client.py" $(CONFORMANCE_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
