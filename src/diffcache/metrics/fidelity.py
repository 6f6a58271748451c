"""Fidelity to the uncached teacher on the same noise: MSE and PSNR, no network needed.

Convention: images in [-1, 1] (the sampler's output), both sides clamped to that range first (what gets
saved), ``data_range = 2`` (peak to peak). Then PSNR = 10 log10(data_range^2 / MSE) equals the PSNR of the
[0, 1] images with range 1. PSNR is computed per image and averaged over images (so it does not depend on
how the set is split into batches or ranks); ``mse`` is the mean over all pixels of all images. Identical
images would give +inf; the per-image MSE is floored at ``data_range^2 * 1e-10``, capping PSNR at 100 dB.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


class TeacherFidelity(Metric):
    """``update(images, teacher)``; ``compute() -> {"mse", "psnr"}``; states are sums, reduced by ``sum``."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, data_range: float = 2.0, clamp: tuple[float, float] | None = (-1.0, 1.0), **kwargs):
        super().__init__(**kwargs)
        if data_range <= 0:
            raise ValueError(f"data_range must be positive, got {data_range}")
        self.data_range, self.clamp = float(data_range), clamp
        for name in ("sq_err_sum", "psnr_sum"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("num_values", "num_images"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, teacher: torch.Tensor) -> None:
        if images.shape != teacher.shape:
            raise ValueError(f"images {tuple(images.shape)} and teacher {tuple(teacher.shape)} differ in shape")
        a, b = images.detach().double(), teacher.detach().double().to(images.device)
        if self.clamp is not None:
            a, b = a.clamp(*self.clamp), b.clamp(*self.clamp)
        err = (a - b).pow(2).reshape(a.shape[0], -1)
        self.sq_err_sum += err.sum()
        self.num_values += err.numel()
        mse_i = err.mean(1).clamp_min(self.data_range ** 2 * 1e-10)
        self.psnr_sum += (10 * torch.log10(self.data_range ** 2 / mse_i)).sum()
        self.num_images += a.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        if int(self.num_images) == 0:
            raise ValueError("TeacherFidelity.compute() before any update(images, teacher)")
        return {"mse": self.sq_err_sum / self.num_values, "psnr": self.psnr_sum / self.num_images}
