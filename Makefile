# Two entry points for a fresh machine: `make train` and `make test` (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: env train test bench bench-gpu teachers clean

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

# Retrain the MNIST demo models into assets/ (classifier, then both teachers side by side, one thread each),
# measure them and rewrite the manifest. The recipe that made the shipped files (assets/MANIFEST.json):
# stage 1 lr 3e-4 / EMA 0.999 for 3000 steps, stage 2 from stage 1's EMA with lr 1e-4 / EMA 0.99 for 1000.
# About 2 h on 2 CPU cores shared with other jobs (~85 min stage 1, ~23 min stage 2, ~3 min classifier).
STAGE1 ?= max_steps=3000
STAGE2 ?= lr=1e-4 ema_decay=0.99 warmup_steps=100 val_every=250 max_steps=1000 seed=1
teachers: env
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py classifier
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_dit $(STAGE1) & \
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_uvit $(STAGE1) & wait
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_dit init=assets/mnist_dit.pt $(STAGE2) & \
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_uvit init=assets/mnist_uvit.pth $(STAGE2) & wait
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py evaluate mnist_dit n_per_class=100
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py evaluate mnist_uvit n_per_class=100
	$(PY) scripts/train_teachers.py manifest


clean:
	rm -rf logs outputs multirun .pytest_cache
