"""DDIM (Song et al. 2021) over ADM/DiT respaced timesteps, matching ADM's ``ddim_sample`` (clip_denoised=False).

The sampler runs the respaced chain from its noisiest kept step (t=999 for section spacing) down to index 0, whose
"previous" alpha_bar is 1 (ADM's ``alphas_cumprod_prev[0]``), so the last update returns the x0 prediction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._common import randn_like, schedule_alphas_cumprod
from .base import ModelOutput, Solver, SolverState, check_eval
from .schedules import alphas_cumprod_of, respace, space_timesteps


class RespacedSchedule:
    """alpha_bar tables of a DiT-respaced chain (index 0 = least noisy kept step)."""

    def __init__(self, num_steps: int, schedule: str, spacing, num_train_timesteps: int, who: str):
        T = int(num_train_timesteps)
        n = int(num_steps)
        if n < 1 or n > T:
            raise ValueError(f"{who}: num_steps must be in [1, {T}] (the schedule has {T} timesteps), got {n}")
        use = space_timesteps(T, spacing if spacing is not None else str(n))
        if len(use) != n:
            raise ValueError(f"{who}: spacing {spacing!r} keeps {len(use)} timesteps but num_steps={n}")
        self.base_alphas_cumprod = schedule_alphas_cumprod(schedule, T)
        self.betas, self.timestep_map = respace(self.base_alphas_cumprod, use)
        self.alphas_cumprod = alphas_cumprod_of(self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.num_steps = n


class _RespacedSolver(Solver):
    """Shared bookkeeping for one-evaluation-per-step samplers on a respaced chain: evaluation nfe runs at respaced
    index ``num_steps - 1 - nfe``."""

    def _setup(self, num_steps, schedule, spacing, num_train_timesteps):
        self.sched = RespacedSchedule(num_steps, schedule, spacing, num_train_timesteps, self.name)
        self.num_steps = self.sched.num_steps
        self.schedule = schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.timestep_map = list(self.sched.timestep_map)
        self.timesteps = self.timestep_map[::-1]  # original timesteps in sampling order

    @property
    def num_evals(self) -> int:
        return self.num_steps

    def _index(self, nfe: int) -> int:
        return self.num_steps - 1 - nfe

    def model_times(self) -> torch.Tensor:
        return torch.tensor(self.timesteps, dtype=torch.float64)

    def step_of(self, nfe: int) -> int:
        return int(nfe)

    def step_start(self, step: int) -> int:
        return int(step)

    def alpha_sigma(self, nfe: int) -> tuple[float, float]:
        a = float(self.sched.alphas_cumprod[self._index(nfe)])
        return math.sqrt(a), math.sqrt(1.0 - a)


class DDIM(_RespacedSolver):
    """Deterministic (eta=0) or stochastic DDIM; ``spacing`` overrides the section count (e.g. ``"ddim20"``)."""

    name = "ddim"

    def __init__(self, num_steps: int, schedule: str = "linear", eta: float = 0.0, spacing=None,
                 num_train_timesteps: int = 1000):
        self._setup(num_steps, schedule, spacing, num_train_timesteps)
        self.eta = float(eta)

    def update(self, state: SolverState, out: ModelOutput, nfe: int, generator: torch.Generator | None = None) -> SolverState:
        check_eval(self, state, nfe)
        i = self._index(nfe)
        a, a_prev = float(self.sched.alphas_cumprod[i]), float(self.sched.alphas_cumprod_prev[i])
        x, x0 = state.x, out.x0
        # ADM re-derives eps from x0 (identical without clipping; keeps the update consistent with x0)
        eps = (math.sqrt(1.0 / a) * x - x0) / math.sqrt(1.0 / a - 1.0)
        sigma = self.eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
        x_new = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0 and i > 0:
            x_new = x_new + sigma * randn_like(x, generator)
        return SolverState(x=x_new, nfe=nfe + 1, extra={})
