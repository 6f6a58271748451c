"""DDPM ancestral sampling on the respaced chain with DiT/ADM's learned-range variance (clip_denoised=False).

The model's variance channels v in [-1, 1] interpolate the log variance between the clipped posterior variance
(v=-1) and beta_t (v=+1), exactly as ADM's ``p_mean_variance`` for ``LEARNED_RANGE``.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import randn_like
from .base import ModelOutput, SolverState, check_eval
from .ddim import _RespacedSolver


class DDPM(_RespacedSolver):
    name = "ddpm"

    def __init__(self, num_steps: int = 250, schedule: str = "linear", spacing=None, num_train_timesteps: int = 1000):
        self._setup(num_steps, schedule, spacing, num_train_timesteps)
        s = self.sched
        betas, abar, abar_prev = s.betas, s.alphas_cumprod, s.alphas_cumprod_prev
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # the posterior variance is 0 at index 0: ADM clips its log by reusing index 1
        clip = np.append(post_var[1], post_var[1:]) if len(post_var) > 1 else betas.copy()
        self.posterior_log_variance_clipped = np.log(clip)
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)

    def update(self, state: SolverState, out: ModelOutput, nfe: int, generator: torch.Generator | None = None) -> SolverState:
        check_eval(self, state, nfe)
        i = self._index(nfe)
        mean = float(self.posterior_mean_coef1[i]) * out.x0 + float(self.posterior_mean_coef2[i]) * state.x
        if i == 0:  # the last step returns the posterior mean
            return SolverState(x=mean, nfe=nfe + 1, extra={})
        min_log = float(self.posterior_log_variance_clipped[i])
        if out.var_values is None:
            log_var = torch.full_like(mean, min_log)
        else:
            frac = (out.var_values.to(mean.dtype) + 1.0) / 2.0
            log_var = frac * float(self.log_betas[i]) + (1.0 - frac) * min_log
        x_new = mean + torch.exp(0.5 * log_var) * randn_like(mean, generator)
        return SolverState(x=x_new, nfe=nfe + 1, extra={})
