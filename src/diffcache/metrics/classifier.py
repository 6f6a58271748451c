"""A small MNIST CNN: the project's own quality extractor for "MNIST-FID" (features) and "MNIST-IS" (logits).

Inception-v3 features mean nothing on 32x32 grey digits and cannot be downloaded here, so the offline demo
measures samples with a classifier trained on the *train* split only (never on held-out digits). Its
held-out accuracy (>= 98%) is asserted on the shipped weights by ``tests/test_assets.py``.

Input: (B, 1, 32, 32) in [-1, 1]. ``features(x)`` is the 128-d penultimate activation, ``forward(x)`` logits.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.mnist import load_mnist


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MNISTClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-conv128-pool -> global mean -> fc128 (features) -> fc10."""

    feature_dim = 128

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        w = width
        self.body = nn.Sequential(_conv(1, w), _conv(w, w), nn.MaxPool2d(2),          # 16x16
                                  _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
                                  _conv(2 * w, 4 * w), nn.MaxPool2d(2))                # 4x4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 32, 32):
            raise ValueError(f"MNISTClassifier expects (B, 1, 32, 32) images in [-1, 1], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, 128) penultimate features (for MNIST-FID)."""
        self._check(x)
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, 10) logits (for MNIST-IS and class accuracy)."""
        return self.head(self.drop(self.features(x)))


def augment(x: torch.Tensor, g: torch.Generator, max_rot: float = 12.0, max_shift: float = 2.0,
            scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Random rotation / scale / translation (one affine per image), background kept at -1."""
    B = x.shape[0]
    ang = (torch.rand(B, generator=g) * 2 - 1) * math.radians(max_rot)
    s = scale[0] + torch.rand(B, generator=g) * (scale[1] - scale[0])
    sh = (torch.rand(B, 2, generator=g) * 2 - 1) * (2 * max_shift / x.shape[-1])
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``x`` classified as ``y`` (model in eval mode)."""
    was = model.training
    model.eval()
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    model.train(was)
    return hits / len(x)


def train_classifier(epochs: int = 30, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                     seed: int = 0, log=print) -> tuple[MNISTClassifier, dict]:
    """Train on the ``train`` split with augmentation (AdamW, cosine LR); returns the model and its figures."""

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_mnist("train")
    xh, yh = load_mnist("heldout")
    model = MNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0, loss = time.time(), torch.tensor(float("nan"))
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        model.train()
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if ep % 5 == 4 or ep == epochs - 1:
            log(f"classifier epoch {ep + 1}/{epochs} loss {loss.item():.4f} heldout acc {accuracy(model, xh, yh):.4f}")
    model.eval()
    figures = {"final_loss": float(loss.detach()), "heldout_accuracy": accuracy(model, xh, yh),
               "train_accuracy": accuracy(model, x, y), "epochs": epochs, "wall_s": time.time() - t0}
    return model, figures


def load_classifier(path: str | Path) -> MNISTClassifier:
    """The shipped classifier (a plain state dict) in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path} (run `make teachers` to train them)")
    model = MNISTClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
