# Both entry points bootstrap their own virtual environment: nothing here relies on what was installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean docs wheelhouse test-systemd

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

# Every wheel the program needs, built for $(PYTHON), plus flit_core to build it from this tree: copy the
# tree with wheelhouse/ onto a box without PyPI access (README: "A box without PyPI access"). A throwaway
# virtual environment does the work, so that nothing but wheelhouse/ is left here.
WHEELHOUSE ?= wheelhouse
wheelhouse:
	rm -rf $(WHEELHOUSE)
	set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	$(PYTHON) -m venv "$$work/venv"; \
	"$$work/venv/bin/python" -m pip wheel --quiet --use-pep517 --wheel-dir $(WHEELHOUSE) . flit_core
	@ls $(WHEELHOUSE)

# The unit under a real systemd (Debian 12's 252 as PID 1 of a container), installed as the README says:
# start, reload (map, interval, broken file), stop, exit 78, kill -9, the watchdog, a missing credential, the
# offline install. Needs root and apt; a few minutes (the container's root file system is cached in
# SYSTEMD_DIR). Not in `test`.
SYSTEMD_TOOL ?= ../shared/tools/systemd-container
SYSTEMD_DIR ?= /tmp/zkds-systemd
test-systemd:
	$(PYTHON) tests/under_systemd.py --tool $(SYSTEMD_TOOL) --dir $(SYSTEMD_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
