# trackstream developer commands. `make test` is what CI runs (.ci/run, through ops/bootstrap.sh test).
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: bootstrap demo test lint typecheck unit bench clean

bootstrap:
	@bash ops/bootstrap.sh

demo: bootstrap         ## the whole pipeline on embedded defaults, about a minute
	$(BIN)/trackstream demo

test: bootstrap lint typecheck   ## lint, type check, full suite against real servers
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check streams

typecheck:
	$(BIN)/mypy streams

unit: bootstrap         ## the fast tests only (no browser, no chaos)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

bench: bootstrap
	$(BIN)/trackstream bench

clean:
	rm -rf .trackstream .pytest_cache .mypy_cache .ruff_cache
