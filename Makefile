# One-command entry points. Each target creates .venv on first use and installs
# the project with the extras it needs, so a fresh machine needs only Python and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test lint typecheck unit demo bench clean

## The main job: a faulty local fleet served by plain httpx and by resilient, side by side.
demo: $(BIN)/.installed
	$(BIN)/resilient demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,cli,peers,zookeeper,dns,redis]'
	touch $@

## The whole test suite: lint, type check, tests.
test: lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/resilient bench

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .hypothesis
