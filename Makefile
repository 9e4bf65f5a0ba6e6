# Quick start: `make bench` runs the quick benchmark suite (3 seeds, within 10 minutes on 2 CPU
# cores; see docs/bench.md), `make test` the test suite.
# Both create (or reuse) a virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bench test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,bench,baselines]'
	touch $@

bench: $(VENV)/.installed
	$(VENV)/bin/secant bench --suite quick --jobs 2

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples

test: lint
	$(PY) -m pytest
