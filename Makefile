# Two entry points for a fresh machine: `make train` and `make test` (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: env train test bench clean

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

bench: env
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
