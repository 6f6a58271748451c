"""The offline demo's quality metrics: "MNIST-FID" / "MNIST-IS" from the project's own MNIST classifier.

Why not Inception: its weights cannot be downloaded here and its features mean little on 32x32 grey digits.
The extractor is ``assets/mnist_classifier.pt`` (trained on the *train* split only) through the
injectable-extractor path of :class:`~diffcache.metrics.generative.QualityMetrics`: its 128-d penultimate
features give the Frechet distance against the 1,000 held-out digits, its logits the IS-style score. Keys
are ``mnist_fid`` / ``mnist_is`` (never plain ``fid`` / ``is``). The held-out statistics take well under a
second to compute, so they are computed per run, not cached.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..data.mnist import load_mnist
from ..utils.resolvers import assets_dir
from .classifier import load_classifier
from .generative import FeaturesAndLogits, QualityMetrics, to_uint8
from .reference import ReferenceStats, reference_from_images

DEFAULT_CLASSIFIER = assets_dir() / "mnist_classifier.pt"


def mnist_extractor(classifier: str | os.PathLike | None = None) -> FeaturesAndLogits:
    """The shipped classifier as an extractor: features = ``fc(body(x))`` (128-d), logits = ``head``."""

    clf = load_classifier(classifier or DEFAULT_CLASSIFIER)
    ext = FeaturesAndLogits(nn.Sequential(clf.body, clf.fc), clf.head, (1, 32, 32), input="signed")
    ext.identity = f"mnist_classifier:{Path(classifier or DEFAULT_CLASSIFIER).name}"
    return ext


def mnist_reference(extractor: nn.Module, split: str = "heldout") -> ReferenceStats:
    """Statistics of a fixed MNIST split, quantised to uint8 exactly as samples are (lossless for MNIST)."""

    x, _ = load_mnist(split)
    return reference_from_images(to_uint8(x), extractor, batch_size=500, source=f"mnist:{split}")


def build_mnist_metrics(classifier: str | os.PathLike | None = None, reference: str = "heldout",
                        device: str | torch.device = "cpu", **kwargs) -> QualityMetrics:
    """Config entry point (``metrics=mnist``): MNIST-FID / MNIST-IS / precision-recall against ``reference``
    (an MNIST split: heldout | train | all), PSNR / MSE to the teacher."""
    ext = mnist_extractor(classifier)
    return QualityMetrics(ext, mnist_reference(ext, reference), name="mnist", **kwargs).to(device)
