# Two entry points for a fresh machine: `make train` and `make test` (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=
# CPU=1: torch / torchvision from PyTorch's CPU wheel index first (no CUDA wheels: the default PyPI torch on
# Linux pulls ~4 GB of nvidia-* packages that a CPU-only machine never uses)
CPU ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: env train test bench bench-gpu teachers clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(CPU),$(PY) -m pip install -q torch torchvision --index-url $(TORCH_CPU_INDEX))
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

# Retrain the MNIST demo models into assets/ (classifier, then the teachers in stages, see below),
# measure them and rewrite the manifest. The recipe of the shipped files (assets/MANIFEST.json has the exact
# commands, times and losses of every stage): stage 1 AdamW lr 1e-3, 500 warm-up steps, cosine to zero at
# max_steps, clip 1.0, EMA 0.999, batch 64, 8000 steps, capped at 88 min; stage 2 warm-starts from stage 1's
# EMA weights with the v-prediction weighting (module.loss_weight=v), lr 3e-4, 100 warm-up steps, capped at
# 100 min (both stages run both teachers side by side on 2 CPU cores); stage 3, the U-ViT alone on both cores
# (it learns more slowly), repeats stage 2's recipe from stage 2's weights for 20,000 steps.
# (assets/MANIFEST.json records the commands as they were run, with scripts/train_teachers.py's earlier flat
# keys: max_steps -> trainer.max_steps, lr / warmup_steps / loss_weight -> module.*, init -> backbone.ckpt)
TEACHER ?= trainer.max_steps=8000 max_minutes=88
TEACHER2 ?= module.lr=3e-4 module.warmup_steps=100 module.loss_weight=v trainer.max_steps=12000 max_minutes=100
TEACHER3_UVIT ?= module.lr=3e-4 module.warmup_steps=100 module.loss_weight=v trainer.max_steps=20000 max_minutes=120
teachers: env
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py classifier
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_dit $(TEACHER) & \
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_uvit $(TEACHER) & wait
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_dit backbone.ckpt=assets/mnist_dit.pt $(TEACHER2) & \
	OMP_NUM_THREADS=1 $(PY) scripts/train_teachers.py teacher mnist_uvit backbone.ckpt=assets/mnist_uvit.pth $(TEACHER2) & wait
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py teacher mnist_uvit backbone.ckpt=assets/mnist_uvit.pth $(TEACHER3_UVIT)
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py evaluate mnist_dit n_per_class=100
	OMP_NUM_THREADS=2 $(PY) scripts/train_teachers.py evaluate mnist_uvit n_per_class=100
	$(PY) scripts/train_teachers.py manifest


clean:
	rm -rf logs outputs multirun .pytest_cache
