"""Noise schedules: beta tables, ADM/DiT timestep respacing and the continuous VP view of a discrete schedule.

Everything is float64: the solvers' golden tests compare against reference samplers to 1e-4 relative, and a
float32 schedule alone costs ~1e-6 in alpha_bar near t=T.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")


def make_betas(name: str, num_train_timesteps: int = 1000) -> np.ndarray:
    """Beta table of a named schedule (float64 numpy array of length ``num_train_timesteps``).

    ``linear``: ADM/DiT ``get_named_beta_schedule('linear')`` -- linspace(1e-4, 0.02) scaled by 1000/T so the
    schedule keeps its shape for other T (the scale is 1 for T=1000).
    ``scaled_linear``: Stable Diffusion / U-ViT / PixArt -- linspace(sqrt(0.00085), sqrt(0.012))**2.
    """
    T = int(num_train_timesteps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")
    if name == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}")


def alphas_cumprod_of(betas) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 (as ADM's GaussianDiffusion)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Timesteps kept by ADM/DiT respacing (``respace.py``), sorted ascending.

    ``section_counts``: an int, a list of ints, a comma string (``"10,15,20"``: the T steps are cut into equal
    sections and each section is strided to its count, endpoints included) or ``"ddimN"`` (the single integer
    stride that yields exactly N steps starting at 0, as the DDIM paper). Behaviour, including Python's
    round-half-to-even on an accumulated float stride, follows the reference so that e.g. ``"20"`` gives
    0, 53, 105, ..., 946, 999 as DiT samples.
    """
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, T):
                if len(range(0, T, stride)) == want:
                    return list(range(0, T, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride over {T} timesteps")
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("section_counts is empty")
    base, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} timesteps into {count} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride  # accumulated, not multiplied: the reference rounds the running sum
        start += size
    return sorted(set(kept))


def respace(alphas_cumprod, use_timesteps: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    """(betas, timestep_map) of the respaced chain, as ADM's ``SpacedDiffusion``.

    The kept steps keep their alpha_bar: new beta_i = 1 - alpha_bar_i / alpha_bar_(previous kept step), so
    cumprod(1 - new betas) reproduces alpha_bar at the kept steps; ``timestep_map[i]`` is the original
    timestep the backbone sees at respaced index i.
    """
    keep = set(int(t) for t in use_timesteps)
    last = 1.0
    betas, tmap = [], []
    for i, abar in enumerate(np.asarray(alphas_cumprod, dtype=np.float64)):
        if i in keep:
            betas.append(1.0 - abar / last)
            last = abar
            tmap.append(i)
    return np.asarray(betas, dtype=np.float64), tmap


def _interp(x: float, xp: np.ndarray, fp: np.ndarray) -> float:
    """Piecewise-linear interpolation with linear extrapolation by the end segments (DPM-Solver's
    ``interpolate_fn``); ``xp`` ascending."""
    if x < xp[0]:
        i = 0
    elif x > xp[-1]:
        i = len(xp) - 2
    else:
        return float(np.interp(x, xp, fp))
    return float(fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i]))


class DiscreteVP:
    """Continuous-time VP view of a discrete schedule, as the official DPM-Solver ``NoiseScheduleVP('discrete')``.

    Discrete step n (0-based) sits at t = (n+1)/T; log alpha_t is piecewise linear in t between those knots
    (linear extrapolation outside), so t=1 is the last training step and t=1/T the first.
    """

    def __init__(self, alphas_cumprod=None, betas=None):
        if (alphas_cumprod is None) == (betas is None):
            raise ValueError("pass exactly one of alphas_cumprod or betas")
        if betas is not None:
            log_alpha = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, dtype=np.float64)))
        else:
            log_alpha = 0.5 * np.log(np.asarray(alphas_cumprod, dtype=np.float64))
        self.total_N = len(log_alpha)
        self.T = 1.0
        self.eps = 1e-3
        self.t_array = np.linspace(0.0, 1.0, self.total_N + 1, dtype=np.float64)[1:]
        self.log_alpha_array = log_alpha
        # descending log-alpha -> ascending after flip, for the inverse map
        self._inv_x = self.log_alpha_array[::-1].copy()
        self._inv_y = self.t_array[::-1].copy()

    def marginal_log_mean_coeff(self, t: float) -> float:
        return _interp(float(t), self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t: float) -> float:
        return math.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: float) -> float:
        return math.sqrt(-math.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: float) -> float:
        """half log-SNR: log alpha_t - log sigma_t."""
        la = self.marginal_log_mean_coeff(t)
        return la - 0.5 * math.log(-math.expm1(2.0 * la))

    def inverse_lambda(self, lamb: float) -> float:
        """t with marginal_lambda(t) = lamb: log alpha from lambda, then the piecewise-linear inverse of the
        log-alpha table (exact inverse of ``marginal_lambda`` inside the table)."""
        lamb = float(lamb)
        # log alpha = -0.5 * logaddexp(0, -2 lambda), computed stably
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lamb)
        return _interp(float(log_alpha), self._inv_x, self._inv_y)

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        return self.marginal_alpha(t), self.marginal_std(t)
