"""k-NN manifold precision and recall (Kynkäänniemi et al., 2019, "Improved Precision and Recall").

Each set's manifold is the union of balls around its points, the radius of a ball being the distance to
the point's k-th nearest neighbour in its own set (the point itself excluded; k = 3 as in the paper and
in the ADM evaluator). Precision = fraction of generated points inside the real manifold; recall =
fraction of real points inside the generated manifold; "inside" is ``distance <= radius`` as in the
official code. Distances come from ``|a|^2 + |b|^2 - 2 a.b`` in float32 matrix products, in row blocks,
like the ADM evaluator; clamped at 0 so identical points are at distance 0 up to float32 round-off.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(0)


def knn_radii(feats: torch.Tensor, k: int = 3, block: int = 1000) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set (N must exceed k)."""
    if feats.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {feats.shape[0]}")
    out = [_sq_dists(feats[i:i + block], feats).kthvalue(k + 1, dim=1).values  # +1: the point itself
           for i in range(0, feats.shape[0], block)]
    return torch.cat(out).sqrt()


def coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int = 1000) -> float:
    """Fraction of ``queries`` lying within ``radii`` of at least one point of ``manifold``."""
    r2 = radii.pow(2)
    hits = [(_sq_dists(queries[i:i + block], manifold) <= r2[None]).any(1) for i in range(0, queries.shape[0], block)]
    return torch.cat(hits).sum().item() / queries.shape[0]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, real_radii: torch.Tensor | None = None,
                     block: int = 1000) -> dict[str, float]:
    """Improved precision and recall of ``fake`` (N, D) against ``real`` (M, D) features."""
    real, fake = real.float(), fake.float().to(real.device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs (N, D) features of equal D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    real_radii = knn_radii(real, k, block) if real_radii is None else real_radii.to(real.device)
    return {"precision": coverage(real, real_radii, fake, block),
            "recall": coverage(fake, knn_radii(fake, k, block), real, block)}


class ManifoldPrecisionRecall(Metric):
    """Gathers generated features across ranks (``cat``) and scores them against fixed real features."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, real_features: torch.Tensor, k: int = 3, block: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.k, self.block = int(k), int(block)
        # Plain CPU attribute, not a buffer (DDP would broadcast it every forward); the real radii are
        # computed once, on the device of the first compute(), and kept there.
        self.real_features = torch.as_tensor(real_features).detach().float().cpu()
        if self.real_features.dim() != 2 or self.real_features.shape[0] <= self.k:
            raise ValueError(f"precision/recall with k={k} needs (N > {k}, D) real features, got "
                             f"{tuple(self.real_features.shape)}")
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor) -> None:
        self.fake_features.append(features.detach().float())

    def compute(self) -> dict[str, torch.Tensor]:
        fake = dim_zero_cat(self.fake_features)
        if self._real is None or self._real[0].device != fake.device:
            real = self.real_features.to(fake.device)
            self._real = real, knn_radii(real, self.k, self.block)
        pr = precision_recall(*self._real[:1], fake, self.k, self._real[1], self.block)
        return {k: torch.tensor(v) for k, v in pr.items()}
