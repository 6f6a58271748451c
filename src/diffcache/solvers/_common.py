"""Small helpers shared by the solver families (schedule construction, noise)."""
from __future__ import annotations

import numpy as np
import torch

from .schedules import alphas_cumprod_of, make_betas


def schedule_alphas_cumprod(schedule: str, num_train_timesteps: int) -> np.ndarray:
    """float64 alpha_bar of a named beta schedule."""
    return alphas_cumprod_of(make_betas(schedule, num_train_timesteps))


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on the generator's own device (a CPU
    generator can drive a CUDA sample) and moved to ``x``."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return noise.to(x.device)
