# The two commands the README opens with: `make up` and `make test`.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: up test lint format bench sync

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet "uv>=0.5"

sync: $(UV)
	$(UV) sync --frozen --all-packages

up: sync ## install from the lock file and run the whole system
	$(UV) run --frozen imgpipe up

test: sync ## install from the lock file and run every test
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy
	$(UV) run --frozen pytest

lint: sync
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

bench: sync
	$(UV) run --frozen python bench/run.py $(ARGS)
