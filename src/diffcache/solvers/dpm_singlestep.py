"""Singlestep DPM-Solver of order up to 3: DPM-Solver-3 (fixed order) and DPM-Solver-fast (mixed orders, fixed NFE).

A step s -> t of order p evaluates the model at s and at p - 1 inner points s_j (lambda_j = lambda_s + r_j h), then
jumps to t. With z = -h and (c_u, b_u) = (sigma_u / sigma_s, alpha_u) in data prediction (x0), z = h and
(c_u, b_u) = (alpha_u / alpha_s, sigma_u) in noise prediction (eps), phi(r) = expm1(r z) and
chi(r) = phi(r) / (r z) - 1, the official 'dpmsolver' updates (``dpm_solver_pytorch.py``, ``dpm_solver_pp.py``) read

    to s_1:           c x - b [phi(r1) m0]
    to s_2 (p = 3):   c x - b [phi(r2) m0 + (r2 / r1) chi(r2) (m1 - m0)]
    to t,  p = 1:     c x - b [phi(1) m0]
    to t,  p = 2:     c x - b [phi(1) (m0 + (m1 - m0) / (2 r1))]
    to t,  p = 3:     c x - b [phi(1) m0 + chi(1) (m2 - m0) / r2]

where m_j is the model output at s_j (m0 at s). Inner points are fed to the model at inverse_lambda(lambda_j), as
the official code does.
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from .base import ModelOutput, SolverState, check_eval
from .dpm_solver import (MIDPOINTS, PREDICTIONS, _VPSolver, get_time_steps, inner_ratios, singlestep_orders,
                         singlestep_outer_times)


class _SinglestepVP(_VPSolver):
    """Bookkeeping and updates for a list of per-step orders; subclasses choose the orders and the grid.

    Evaluation nfe belongs to step ``step_of(nfe)``; within a step, ``state.x`` is the next inner sample and ``extra``
    holds the step-start sample and the model outputs so far (so teacher and student trajectories stay apart).
    """

    def _setup(self, nfe, schedule, prediction, skip_type, t_end, time_input, num_train_timesteps, midpoint):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if midpoint not in MIDPOINTS:
            raise ValueError(f"unknown midpoint rule {midpoint!r}; choose one of {MIDPOINTS}")
        self._setup_schedule(schedule, time_input, num_train_timesteps)
        self.nfe, self.prediction, self.skip_type, self.midpoint = int(nfe), prediction, skip_type, midpoint
        # official default t_end = 1/N (U-ViT passes eps = 1/N)
        self.t_end = 1.0 / self.num_train_timesteps if t_end is None else float(t_end)

    def _build(self, orders, times) -> None:
        self.orders, self.times = [int(o) for o in orders], np.asarray(times, dtype=np.float64)
        self.num_steps = len(self.orders)
        if self.num_steps > self.num_train_timesteps:
            raise ValueError(f"{self.num_steps} solver steps exceed the schedule's {self.num_train_timesteps} "
                             f"timesteps")
        self._starts = [0] + np.cumsum(self.orders).tolist()
        self.ratios, ev = [], []
        for i, p in enumerate(self.orders):
            s, t = self.times[i], self.times[i + 1]
            rs = inner_ratios(self.ns, self.midpoint, self.skip_type, s, t, p)
            lam_s, lam_t = self.ns.marginal_lambda(s), self.ns.marginal_lambda(t)
            self.ratios.append(rs)
            ev += [s] + [self.ns.inverse_lambda(lam_s + r * (lam_t - lam_s)) for r in rs]
        self._set_eval_times(ev)
        self.timesteps = [self._backbone_time(t) for t in self.times[:-1]]  # backbone time at each step start

    def step_of(self, nfe: int) -> int:
        if not 0 <= nfe < self.num_evals:
            raise IndexError(f"evaluation {nfe} out of range for {self.name} with {self.num_evals} evaluations")
        return bisect.bisect_right(self._starts, int(nfe)) - 1

    def step_start(self, step: int) -> int:
        return int(self._starts[int(step)])

    def update(self, state: SolverState, out: ModelOutput, nfe: int, generator: torch.Generator | None = None) -> SolverState:
        check_eval(self, state, nfe)
        i = self.step_of(nfe)
        j, p = nfe - self._starts[i], self.orders[i]
        model = out.x0 if self.prediction == "x0" else out.eps
        x = state.x if j == 0 else state.extra["x_start"]
        m = ([] if j == 0 else state.extra["models"]) + [model]
        la_s, _, s_s, lam_s = self._coeffs(self.times[i])
        h = self._coeffs(self.times[i + 1])[3] - lam_s
        z = -h if self.prediction == "x0" else h

        def phi(r):
            return math.expm1(r * z)

        def chi(r):
            return math.expm1(r * z) / (r * z) - 1.0

        def scale(la_u, a_u, s_u):  # (c_u, b_u) of the docstring
            return (s_u / s_s, a_u) if self.prediction == "x0" else (math.exp(la_u - la_s), s_u)

        if j + 1 < p:  # to the next inner point, evaluation nfe + 1
            c, b = scale(float(self._la[nfe + 1]), float(self._alpha[nfe + 1]), float(self._sigma[nfe + 1]))
            r = self.ratios[i]
            if j == 0:
                x_new = c * x - (b * phi(r[0])) * m[0]
            else:
                x_new = c * x - (b * phi(r[1])) * m[0] - (b * (r[1] / r[0]) * chi(r[1])) * (m[1] - m[0])
            return SolverState(x=x_new, nfe=nfe + 1, extra={"x_start": x, "models": m})
        la_t, a_t, s_t, _ = self._coeffs(self.times[i + 1])
        c, b = scale(la_t, a_t, s_t)
        x_new = c * x - (b * phi(1.0)) * m[0]
        if p == 2:
            x_new = x_new - (b * phi(1.0) * 0.5 / self.ratios[i][0]) * (m[1] - m[0])
        elif p == 3:
            x_new = x_new - (b * chi(1.0) / self.ratios[i][1]) * (m[2] - m[0])
        return SolverState(x=x_new, nfe=nfe + 1, extra={})


class DPMSolver3(_SinglestepVP):
    """DPM-Solver-3 singlestep: ``num_steps`` (the NFE, a multiple of 3) / 3 steps on the ``skip_type`` grid, three
    evaluations each.

    ``midpoint="lambda"`` (default): inner points at r = 1/3, 2/3 in lambda, as U-ViT's ``dpm_solver_pp.py``
    ``method='singlestep'`` with order 3 and the official ``method='singlestep_fixed'``. ``"grid"``: inner points
    from the ``skip_type`` grid between the step ends (the official ``method='singlestep'`` rule, here at fixed
    order). ``prediction``: ``"x0"`` (DPM-Solver++ form, U-ViT's predict_x0=True) or ``"eps"``.
    """

    name = "dpm_solver3"

    def __init__(self, num_steps: int, schedule: str = "linear", prediction: str = "x0",
                 skip_type: str = "time_uniform", t_end: float | None = None, time_input: str = "discrete",
                 num_train_timesteps: int = 1000, midpoint: str = "lambda"):
        nfe = int(num_steps)
        if nfe < 3 or nfe % 3:
            raise ValueError(f"DPM-Solver-3 singlestep needs an NFE that is a multiple of 3, got {nfe} (num_steps "
                             f"is the NFE, three evaluations per step; the references round down to "
                             f"{3 * (nfe // 3)} silently, DPMSolverFast spends exactly {nfe})")
        self._setup(nfe, schedule, prediction, skip_type, t_end, time_input, num_train_timesteps, midpoint)
        K = nfe // 3
        self._build([3] * K, get_time_steps(self.ns, skip_type, self.ns.T, self.t_end, K))


class DPMSolverFast(_SinglestepVP):
    """DPM-Solver-fast: singlestep DPM-Solver that spends exactly ``num_steps`` (the NFE) evaluations by mixing
    orders (order 3, NFE 20: orders [3, 3, 3, 3, 3, 3, 2]), as the official ``method='singlestep'``.

    Step boundaries and inner points come from the ``skip_type`` grid (:func:`singlestep_outer_times`). For
    ``time_uniform`` every evaluation sits on the (NFE + 1)-point uniform grid, exactly as U-ViT's
    ``dpm_solver_pp.py`` ``method='fast'`` runs it, the default of its ``eval_ldm_discrete.py`` (order 3, NFE 20,
    t_end = 1/N, predict_x0=True). U-ViT's ``logSNR`` and ``time_quadratic`` grids differ from the official ones
    (NFE-point lambda grid; a searched sqrt grid); this class follows the official code there.
    """

    name = "dpm_solver_fast"

    def __init__(self, num_steps: int, schedule: str = "linear", order: int = 3, prediction: str = "x0",
                 skip_type: str = "time_uniform", t_end: float | None = None, time_input: str = "discrete",
                 num_train_timesteps: int = 1000):
        self._setup(num_steps, schedule, prediction, skip_type, t_end, time_input, num_train_timesteps, "grid")
        self.order = int(order)
        orders = singlestep_orders(self.nfe, self.order)
        self._build(orders, singlestep_outer_times(self.ns, skip_type, self.ns.T, self.t_end, orders))
