# trackstream developer commands. `make test` is what CI runs (.ci/run, through ops/bootstrap.sh test).
# `make bootstrap` installs missing system packages (Debian, as root or with sudo) and the
# venv; the other targets only (re)create the venv when pyproject.toml changed, never apt.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trackstream-installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: bootstrap demo test lint typecheck unit bench doctor wheel clean

bootstrap:
	@bash ops/bootstrap.sh

$(STAMP): pyproject.toml
	@bash ops/bootstrap.sh --no-system

demo: $(STAMP)          ## the whole pipeline on embedded defaults, about a minute
	$(BIN)/trackstream demo

test: $(STAMP) lint typecheck   ## lint, type check, full suite against real servers
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check streams

typecheck: $(STAMP)
	$(BIN)/mypy streams schemas processors

unit: $(STAMP)          ## the fast tests only (no browser, no chaos)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

bench: $(STAMP)
	$(BIN)/trackstream bench

doctor: $(STAMP)        ## can the pipeline run here? one line per check
	$(BIN)/trackstream doctor

wheel: $(STAMP)         ## dist/trackstream-*.whl
	$(BIN)/python -m build --wheel

clean:
	rm -rf .trackstream .pytest_cache .mypy_cache .ruff_cache build dist
