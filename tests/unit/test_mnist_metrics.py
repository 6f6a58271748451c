"""The MNIST classifier's interface and the Frechet distance / IS arithmetic of the teacher evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcache.modules.classifier import MNISTClassifier, augment
from diffcache.modules.teacher_eval import frechet_distance, inception_style_score


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


def test_frechet_distance_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.5
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_inception_style_score_extremes():
    assert inception_style_score(torch.zeros(20, 10)) == pytest.approx(1.0)  # no class information
    confident = torch.full((10, 10), -1e4)
    confident[torch.arange(10), torch.arange(10)] = 0.0
    assert inception_style_score(confident) == pytest.approx(10.0, rel=1e-9)  # sure and diverse: K classes
    assert math.isfinite(inception_style_score(torch.randn(7, 10)))
