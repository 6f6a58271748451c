"""Small helpers shared by the solver families (schedule construction, noise)."""
from __future__ import annotations

import numpy as np
import torch

from .schedules import alphas_cumprod_of, make_betas


def schedule_alphas_cumprod(schedule: str, num_train_timesteps: int) -> np.ndarray:
    """float64 alpha_bar of a named beta schedule."""
    return alphas_cumprod_of(make_betas(schedule, num_train_timesteps))


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on the generator's own device (a CPU
    generator can drive a CUDA sample) and moved to ``x``. A list of generators (one per sample, as
    :func:`~diffcache.data.seeded.step_generators` gives) draws row ``j`` from generator ``j``, so a sample's
    step noise does not depend on the batch it runs in."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} per-sample generators for a batch of {x.shape[0]}")
        return torch.stack([randn_like(row, g) for row, g in zip(x, generator)])
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return noise.to(x.device)
