# Both entry points bootstrap their own virtual environment: nothing here relies on what was installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/zkdingsync demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check zkdingsync tests bench
	$(BIN)/ruff format --check zkdingsync tests bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# config.example.yaml and the README's configuration table are generated from zkdingsync/config/schema.py.
docs: $(VENV)/.installed
	$(BIN)/python -m zkdingsync.config.docs

# Every bench_*.py in bench/ (several minutes; figures in BENCHMARKS.md), or some: make bench BENCH=daemon
BENCH ?=
bench: $(VENV)/.installed-test
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
