# Two entry points for a fresh machine: `make train` and `make test` (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: env train test bench teachers clean

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

# Retrain the MNIST demo models into assets/ (classifier, then both teachers side by side, one thread each;
# about 2 h on 2 CPU cores, see assets/MANIFEST.json), measure them and rewrite the manifest.
TEACHER_ARGS ?= max_steps=12000 max_minutes=110
teachers: env
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py classifier
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_dit $(TEACHER_ARGS) & \
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_uvit $(TEACHER_ARGS) & wait
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py evaluate mnist_dit
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py evaluate mnist_uvit
	$(PY) scripts/train_teachers.py manifest

bench: env
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
