"""DPM-Solver-2 (singlestep) and DPM-Solver++ 2M (multistep) on the continuous VP view of a discrete schedule, and
the singlestep time grids (orders, step boundaries, inner points) that :mod:`.dpm_singlestep` shares.

Both follow the official DPM-Solver code (``NoiseScheduleVP('discrete')``, ``get_time_steps``, the second-order
updates with solver_type 'dpmsolver'); the exponential-integrator formulas are written in lambda = log(alpha/sigma)
so the linear part is integrated exactly and only the model output is approximated.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._common import schedule_alphas_cumprod
from .base import ModelOutput, Solver, SolverState, check_eval
from .schedules import DiscreteVP

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
TIME_INPUTS = ("discrete", "scaled")
PREDICTIONS = ("x0", "eps")
MIDPOINTS = ("lambda", "grid")


def get_time_steps(ns: DiscreteVP, skip_type: str, t_T: float, t_0: float, N: int) -> np.ndarray:
    """N+1 decreasing continuous times from t_T to t_0 (official ``get_time_steps``)."""
    if skip_type == "time_uniform":
        return np.linspace(t_T, t_0, N + 1, dtype=np.float64)
    if skip_type == "logSNR":
        lams = np.linspace(ns.marginal_lambda(t_T), ns.marginal_lambda(t_0), N + 1, dtype=np.float64)
        ts = np.array([ns.inverse_lambda(l) for l in lams], dtype=np.float64)
        ts[0], ts[-1] = t_T, t_0  # the interpolated inverse reproduces the ends up to rounding; pin them
        return ts
    if skip_type == "time_quadratic":
        return np.linspace(t_T ** 0.5, t_0 ** 0.5, N + 1, dtype=np.float64) ** 2
    raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {SKIP_TYPES}")


def singlestep_orders(nfe: int, order: int) -> list[int]:
    """Per-step orders that use exactly ``nfe`` evaluations (official ``get_orders_and_timesteps_for_singlestep_
    solver``, "DPM-Solver-fast"): order 3 takes ``nfe // 3 + 1`` steps ending in [2, 1], [1] or [2] by ``nfe % 3``;
    order 2 ends in one first-order step when ``nfe`` is odd."""
    n = int(nfe)
    if n < 1:
        raise ValueError(f"the NFE must be >= 1, got {n}")
    if order == 3:
        k = n // 3 + 1
        return [3] * (k - 2) + [2, 1] if n % 3 == 0 else [3] * (k - 1) + ([1] if n % 3 == 1 else [2])
    if order == 2:
        return [2] * (n // 2) + [1] * (n % 2)
    if order == 1:
        return [1] * n
    raise ValueError(f"singlestep DPM-Solver order must be 1, 2 or 3, got {order}")


def singlestep_outer_times(ns: DiscreteVP, skip_type: str, t_T: float, t_0: float, orders) -> np.ndarray:
    """Step boundaries of official ``method='singlestep'``: for ``logSNR`` a uniform-lambda grid of len(orders)
    steps ("to reproduce the paper"), otherwise the ``skip_type`` grid of NFE = sum(orders) points, keeping the
    point where each step starts."""
    if skip_type == "logSNR":
        return get_time_steps(ns, skip_type, t_T, t_0, len(orders))
    return get_time_steps(ns, skip_type, t_T, t_0, int(sum(orders)))[np.cumsum([0] + list(orders))]


def inner_ratios(ns: DiscreteVP, rule: str, skip_type: str, s: float, t: float, order: int) -> list[float]:
    """r_j = (lambda(s_j) - lambda_s) / h of the ``order - 1`` inner points of a step s -> t.

    ``"lambda"``: r_j = j / order (U-ViT ``dpm_solver_pp.py`` / official defaults r1 = 1/2; 1/3, 2/3).
    ``"grid"``: s_j from the ``skip_type`` grid between s and t (official ``method='singlestep'``).
    """
    if rule == "lambda":
        return [j / order for j in range(1, order)]
    if rule != "grid":
        raise ValueError(f"unknown midpoint rule {rule!r}; choose one of {MIDPOINTS}")
    lam = [ns.marginal_lambda(u) for u in get_time_steps(ns, skip_type, s, t, order)]
    return [(lam[j] - lam[0]) / (lam[-1] - lam[0]) for j in range(1, order)]


class _VPSolver(Solver):
    """Continuous-time bookkeeping: per-evaluation times, (alpha, sigma, lambda) and the backbone time input."""

    def _setup_schedule(self, schedule, time_input, num_train_timesteps):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {time_input!r}; choose one of {TIME_INPUTS}")
        self.schedule = schedule
        self.time_input = time_input
        self.num_train_timesteps = T = int(num_train_timesteps)
        self.ns = DiscreteVP(alphas_cumprod=schedule_alphas_cumprod(schedule, T))

    def _backbone_time(self, t: float) -> float:
        # official model_wrapper for discrete models: (t - 1/N) * 1000 maps t=(n+1)/N to index n;
        # U-ViT feeds t_continuous * N directly.
        if self.time_input == "discrete":
            return (t - 1.0 / self.num_train_timesteps) * 1000.0
        return t * self.num_train_timesteps

    def _set_eval_times(self, ts) -> None:
        self.eval_t = np.asarray(ts, dtype=np.float64)
        self._la = np.array([self.ns.marginal_log_mean_coeff(t) for t in self.eval_t])
        self._alpha = np.exp(self._la)
        self._sigma = np.sqrt(-np.expm1(2.0 * self._la))
        self._lambda = self._la - np.log(self._sigma)

    def _coeffs(self, t: float) -> tuple[float, float, float, float]:
        """(log alpha, alpha, sigma, lambda) at continuous time t."""
        la = self.ns.marginal_log_mean_coeff(t)
        sigma = math.sqrt(-math.expm1(2.0 * la))
        return la, math.exp(la), sigma, la - math.log(sigma)

    @property
    def num_evals(self) -> int:
        return len(self.eval_t)

    def model_times(self) -> torch.Tensor:
        return torch.tensor([self._backbone_time(t) for t in self.eval_t], dtype=torch.float64)

    def alpha_sigma(self, nfe: int) -> tuple[float, float]:
        return float(self._alpha[nfe]), float(self._sigma[nfe])


class DPMSolver2(_VPSolver):
    """DPM-Solver-2 singlestep, two evaluations per step: at t_i, then at an inner point s_i.

    ``midpoint="lambda"`` (default): s_i is the lambda-midpoint (r1 = 1/2), as U-ViT's ``dpm_solver_pp.py``
    (``method='singlestep'``, the sampler L2C's U-ViT runs). ``midpoint="grid"``: the official DPM-Solver
    ``dpm_solver_pytorch.py`` ``method='singlestep'``, order 2: s_i comes from the ``skip_type`` grid (for
    ``time_uniform`` the time midpoint, r1 = (lambda(s_i) - lambda(t_i)) / h), and the step boundaries are every
    other point of the NFE grid. ``prediction="x0"`` is the data-prediction form (DPM-Solver++(2S) with the
    'dpmsolver' correction, U-ViT's predict_x0=True); ``"eps"`` the original noise-prediction DPM-Solver-2.
    ``num_steps`` is the NFE. State: after the first evaluation of a step ``state.x`` is the inner sample and
    ``extra`` holds the step-start sample and model output the second-order update needs.
    """

    name = "dpm_solver2"

    def __init__(self, num_steps: int, schedule: str = "linear", prediction: str = "x0",
                 skip_type: str = "time_uniform", t_end: float | None = 1e-3, time_input: str = "discrete",
                 num_train_timesteps: int = 1000, midpoint: str = "lambda"):
        nfe = int(num_steps)
        if nfe < 2 or nfe % 2:
            raise ValueError(f"DPM-Solver-2 singlestep needs an even NFE, got {nfe} (num_steps is the NFE: two "
                             f"model evaluations per solver step)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if midpoint not in MIDPOINTS:
            raise ValueError(f"unknown midpoint rule {midpoint!r}; choose one of {MIDPOINTS}")
        self._setup_schedule(schedule, time_input, num_train_timesteps)
        K = nfe // 2
        if K > self.num_train_timesteps:
            raise ValueError(f"{K} solver steps exceed the schedule's {self.num_train_timesteps} timesteps")
        self.nfe, self.num_steps, self.prediction, self.skip_type = nfe, K, prediction, skip_type
        self.midpoint = midpoint
        self.t_end = 1e-3 if t_end is None else float(t_end)
        if midpoint == "grid":
            self.times = singlestep_outer_times(self.ns, skip_type, self.ns.T, self.t_end, [2] * K)
        else:
            self.times = get_time_steps(self.ns, skip_type, self.ns.T, self.t_end, K)  # t_0 = 1 > ... > t_K
        self.r1s = np.array([inner_ratios(self.ns, midpoint, skip_type, self.times[i], self.times[i + 1], 2)[0]
                             for i in range(K)])
        lam = np.array([self.ns.marginal_lambda(t) for t in self.times])
        self.mid_times = np.array([self.ns.inverse_lambda(lam[i] + self.r1s[i] * (lam[i + 1] - lam[i]))
                                   for i in range(K)])
        ev = np.empty(2 * K)
        ev[0::2], ev[1::2] = self.times[:-1], self.mid_times
        self._set_eval_times(ev)
        self.timesteps = [self._backbone_time(t) for t in self.times[:-1]]  # backbone time at each step start

    def step_of(self, nfe: int) -> int:
        return int(nfe) // 2

    def step_start(self, step: int) -> int:
        return 2 * int(step)

    def update(self, state: SolverState, out: ModelOutput, nfe: int, generator: torch.Generator | None = None) -> SolverState:
        check_eval(self, state, nfe)
        i = nfe // 2
        la_t, a_t, s_t, lam_t = self._coeffs(self.times[i])
        la_n, a_n, s_n, lam_n = self._coeffs(self.times[i + 1])
        h = lam_n - lam_t
        r1 = float(self.r1s[i])
        model = out.x0 if self.prediction == "x0" else out.eps
        if nfe % 2 == 0:  # step start -> midpoint (first-order update over r1*h)
            la_s, a_s, s_s = float(self._la[nfe + 1]), float(self._alpha[nfe + 1]), float(self._sigma[nfe + 1])
            x = state.x
            if self.prediction == "x0":
                x_mid = (s_s / s_t) * x - (a_s * math.expm1(-r1 * h)) * model
            else:
                x_mid = math.exp(la_s - la_t) * x - (s_s * math.expm1(r1 * h)) * model
            return SolverState(x=x_mid, nfe=nfe + 1, extra={"x_start": x, "model_start": model})
        x, m0 = state.extra["x_start"], state.extra["model_start"]
        if self.prediction == "x0":
            phi = math.expm1(-h)
            x_new = (s_n / s_t) * x - (a_n * phi) * m0 - (0.5 / r1) * (a_n * phi) * (model - m0)
        else:
            phi = math.expm1(h)
            x_new = math.exp(la_n - la_t) * x - (s_n * phi) * m0 - (0.5 / r1) * (s_n * phi) * (model - m0)
        return SolverState(x=x_new, nfe=nfe + 1, extra={})


class DPMSolverPP2M(_VPSolver):
    """DPM-Solver++(2M) multistep in data prediction, one evaluation per step (PixArt's sampler).

    The first step (no history) is first order; with ``lower_order_final`` and fewer than 10 steps the final step is
    first order too (official code). ``extra`` keeps the previous x0 prediction and its lambda; a state started
    mid-trajectory without history therefore takes a first-order step first.
    """

    name = "dpm_solver_pp"

    def __init__(self, num_steps: int, schedule: str = "linear", skip_type: str = "time_uniform",
                 t_end: float | None = None, time_input: str = "discrete", num_train_timesteps: int = 1000,
                 lower_order_final: bool = True):
        K = int(num_steps)
        self._setup_schedule(schedule, time_input, num_train_timesteps)
        if K < 1 or K > self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_timesteps}] (the schedule's timesteps), "
                             f"got {K}")
        self.num_steps, self.skip_type, self.lower_order_final = K, skip_type, bool(lower_order_final)
        self.t_end = 1.0 / self.num_train_timesteps if t_end is None else float(t_end)
        self.times = get_time_steps(self.ns, skip_type, self.ns.T, self.t_end, K)
        self._set_eval_times(self.times[:-1])
        self.timesteps = [self._backbone_time(t) for t in self.times[:-1]]

    def step_of(self, nfe: int) -> int:
        return int(nfe)

    def step_start(self, step: int) -> int:
        return int(step)

    def order_of(self, nfe: int, has_history: bool) -> int:
        if not has_history:
            return 1
        if self.lower_order_final and self.num_steps < 10 and nfe == self.num_steps - 1:
            return 1
        return 2

    def update(self, state: SolverState, out: ModelOutput, nfe: int, generator: torch.Generator | None = None) -> SolverState:
        check_eval(self, state, nfe)
        _, a_s, s_s, lam_s = self._coeffs(self.times[nfe])
        _, a_n, s_n, lam_n = self._coeffs(self.times[nfe + 1])
        h = lam_n - lam_s
        phi = math.expm1(-h)
        m0 = out.x0
        x_new = (s_n / s_s) * state.x - (a_n * phi) * m0
        if self.order_of(nfe, "prev_x0" in state.extra) == 2:
            r0 = (lam_s - state.extra["prev_lambda"]) / h
            d1 = (1.0 / r0) * (m0 - state.extra["prev_x0"])
            x_new = x_new - 0.5 * (a_n * phi) * d1
        return SolverState(x=x_new, nfe=nfe + 1, extra={"prev_x0": m0, "prev_lambda": lam_s})
