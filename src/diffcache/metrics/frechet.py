"""Fréchet distance between Gaussians fitted to feature sets (the FID formula), in float64.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Heusel et al., 2017).

tr((S1 S2)^(1/2)) is computed as tr((sqrt(S1) S2 sqrt(S1))^(1/2)): the matrix under the root is
symmetric positive semi-definite, so two symmetric eigendecompositions give it with real arithmetic and
no complex round-off (``scipy.linalg.sqrtm(S1 @ S2)`` as in pytorch-fid, and ``eigvals(S1 @ S2)`` as in
torchmetrics, work on a non-symmetric product instead). Negative eigenvalues are round-off and clamp to 0.
"""
from __future__ import annotations

import numpy as np
import torch


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", torch.float64)


def feature_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (divide by N - 1, as numpy.cov / pytorch-fid / ADM) of (N, D) features."""
    f = _f64(features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs an (N >= 2, D) matrix, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def stats_from_sums(total: torch.Tensor, outer: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from running sums (sum f, sum f f^T, N) as torchmetrics' FID keeps them."""
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    total, outer = _f64(total), _f64(outer)
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); inputs may be numpy or torch."""
    mu1, mu2, sigma1, sigma2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1), _f64(sigma1), _f64(sigma2)
    d = mu1.shape[0]
    if mu2.shape[0] != d or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"FID statistics disagree in dimension: mu {d} vs {mu2.shape[0]}, sigma "
                         f"{tuple(sigma1.shape)} vs {tuple(sigma2.shape)} (same feature extractor on both sides?)")
    r1 = _psd_sqrt(sigma1)
    m = r1 @ sigma2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)
