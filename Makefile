# Two entry points for a fresh machine: `make train` and `make test` (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: env train test bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

env: $(VENV)/.installed

train: env
	$(PY) train.py $(ARGS)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the benchmarks also compare with cache-dit (the `bench` extra)
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks cpu $(ARGS)

bench-gpu: $(VENV)/.bench
	$(PY) -m benchmarks gpu $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
