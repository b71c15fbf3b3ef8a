# Two commands a newcomer needs: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
SOURCES := $(VENV)/.sources
# An editable install that type checkers can follow: a tree of links to the
# modules (the package is trioflow, the folders are core/ and web/).
EDITABLE := --config-settings editable_mode=strict

.PHONY: install serve test lint bench clean FORCE

install: $(STAMP)

# The editable install links each file, so it is redone when pyproject.toml
# changes or when files come or go (not when they are edited).
$(SOURCES): FORCE
	@mkdir -p $(VENV)
	@find core web -type f ! -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@cmp -s $@.new $@ && rm -f $@.new || mv $@.new $@

$(STAMP): pyproject.toml $(SOURCES)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[dev,postgresql]'
	@touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[dev,postgresql,bench]'
	@touch $(BENCH_STAMP)

# make serve ARGS="--tools mytools --graphs my_graph.json" adds options.
serve: install
	$(BIN)/trioflow serve --host 127.0.0.1 --port 8000 --samples $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check core web tests samples bench
	$(BIN)/ruff format --check core web tests samples bench
	$(BIN)/mypy -p trioflow

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
