"""Singlestep DPM-Solver beyond the lambda-midpoint DPM-Solver-2: the official grid midpoint, DPM-Solver-3 and
DPM-Solver-fast. References: diffusers' DPMSolverSinglestepScheduler (an independent implementation of the same
updates), the official order rule's docstring, and the exact probability-flow ODE of Gaussian data (fp64), whose
oracle helpers come from test_solvers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_solvers import _dpm_sigmas, _slope, _vp_error, exact_eps, model_output, noise, rel, run
from tiny_models import perturbed

from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy, make_schedule, shifted_schedule
from diffcache.sampling import sample
from diffcache.solvers import DPMSolver2
from diffcache.solvers.dpm_singlestep import DPMSolver3, DPMSolverFast
from diffcache.solvers.dpm_solver import singlestep_orders

PAIRS = [("x0", "dpmsolver++"), ("eps", "dpmsolver")]


# ------------------------------------------------------------------------------------------------ grids and orders
def test_orders_follow_the_official_rule():
    # official docstring: order 3 takes K = NFE // 3 + 1 steps ending in [2, 1] / [1] / [2] for NFE % 3 = 0 / 1 / 2
    assert singlestep_orders(20, 3) == [3] * 6 + [2]
    assert singlestep_orders(21, 3) == [3] * 6 + [2, 1]
    assert singlestep_orders(22, 3) == [3] * 7 + [1]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1] and singlestep_orders(4, 1) == [1] * 4
    from diffusers import DPMSolverSinglestepScheduler

    sch = DPMSolverSinglestepScheduler(solver_order=3, lower_order_final=True, final_sigmas_type="sigma_min")
    for nfe in range(3, 31):  # diffusers lists per-evaluation orders 1, 2, 3, 1, 2, ...: a 1 starts a step
        per_eval = sch.get_order_list(nfe)
        starts = [k for k, o in enumerate(per_eval) if o == 1] + [nfe]
        assert singlestep_orders(nfe, 3) == list(np.diff(starts)), nfe
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        singlestep_orders(20, 4)


def test_grid_midpoint_is_the_time_midpoint():
    lam_rule = DPMSolver2(20, "scaled_linear")
    grid = DPMSolver2(20, "scaled_linear", midpoint="grid")
    t = np.linspace(1.0, 1e-3, 11)
    np.testing.assert_allclose(grid.times, t, rtol=0, atol=1e-15)
    np.testing.assert_allclose(grid.mid_times, (t[:-1] + t[1:]) / 2, rtol=0, atol=1e-12)
    ns = grid.ns
    for i in range(10):  # r1 = (lambda(t_mid) - lambda_s) / h
        lam_s, lam_m, lam_t = (ns.marginal_lambda(u) for u in (t[i], (t[i] + t[i + 1]) / 2, t[i + 1]))
        assert grid.r1s[i] == pytest.approx((lam_m - lam_s) / (lam_t - lam_s), rel=1e-12)
    assert grid.r1s[-1] < 0.25 and np.all(lam_rule.r1s == 0.5)  # the last step spans most of the lambda range
    np.testing.assert_array_equal(lam_rule.times, grid.times)  # same outer grid, other inner point
    assert not np.allclose(lam_rule.mid_times, grid.mid_times, atol=1e-3)


def test_fast_evaluates_on_the_nfe_grid():
    """time_uniform: every evaluation sits on linspace(1, t_end, NFE + 1), as U-ViT's method='fast' runs it."""
    s = DPMSolverFast(20, "scaled_linear", time_input="scaled")
    assert s.orders == [3] * 6 + [2] and s.num_evals == s.nfe == 20 and s.num_steps == 7 and s.t_end == 1e-3
    grid = np.linspace(1.0, 1e-3, 21)
    np.testing.assert_allclose(s.eval_t, grid[:-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.model_times().numpy(), 1000 * grid[:-1], rtol=0, atol=1e-9)
    assert [s.step_of(k) for k in range(20)] == [k // 3 for k in range(18)] + [6, 6]
    assert [s.step_start(i) for i in range(7)] == [0, 3, 6, 9, 12, 15, 18]
    d3 = DPMSolver3(9, skip_type="logSNR")
    lam = np.array([d3.ns.marginal_lambda(u) for u in d3.eval_t] + [d3.ns.marginal_lambda(d3.times[-1])])
    np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 9, rtol=1e-9)  # lambda thirds of equal steps


# ------------------------------------------------------------------------------------------- golden: diffusers
def _diffusers_run(solver, algo):
    """diffusers' singlestep scheduler fed our evaluation times as its sigmas and our per-step orders. The
    official order-3 step reaches its second inner point with diffusers' 'heun' second-order form and ends with
    its 'midpoint' third-order form; every other substep is 'midpoint' (solver_type is switched per call)."""
    from diffusers import DPMSolverSinglestepScheduler

    n = solver.num_evals
    sch = DPMSolverSinglestepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", solver_order=3,
                                       algorithm_type=algo, solver_type="midpoint", lower_order_final=True,
                                       final_sigmas_type="sigma_min")
    sch.set_timesteps(n)
    sch.sigmas = _dpm_sigmas(list(solver.eval_t) + [solver.times[-1]], solver.ns)
    orders = getattr(solver, "orders", [2] * solver.num_steps)
    sch.order_list = [j + 1 for p in orders for j in range(p)]
    sch.set_begin_index(0)
    x = noise()
    for k in range(n):
        step = solver.step_of(k)
        heun = orders[step] == 3 and k - solver.step_start(step) == 1
        sch.register_to_config(solver_type="heun" if heun else "midpoint")
        sig = float(sch.sigmas[k])
        a = 1.0 / math.sqrt(sig * sig + 1.0)
        x = sch.step(exact_eps(x, a, sig * a), sch.timesteps[k], x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:.*dpmsolver.*deprecated:FutureWarning")
@pytest.mark.parametrize("prediction,algo", PAIRS)
@pytest.mark.parametrize("make", [
    lambda p: DPMSolver2(20, "scaled_linear", prediction=p, midpoint="grid"),
    lambda p: DPMSolver2(20, "scaled_linear", prediction=p, midpoint="grid", skip_type="time_quadratic"),
    lambda p: DPMSolver3(18, "scaled_linear", prediction=p),
    lambda p: DPMSolver3(18, "scaled_linear", prediction=p, midpoint="grid", skip_type="time_quadratic"),
    lambda p: DPMSolverFast(20, "scaled_linear", prediction=p, time_input="scaled"),
    lambda p: DPMSolverFast(21, "scaled_linear", prediction=p),
    lambda p: DPMSolverFast(22, "scaled_linear", prediction=p, skip_type="logSNR"),
    lambda p: DPMSolverFast(9, "scaled_linear", prediction=p, order=2),
])
def test_singlestep_matches_diffusers(make, prediction, algo):
    solver = make(prediction)
    assert rel(run(solver, noise()), _diffusers_run(solver, algo)) < 1e-10


# ------------------------------------------------------------------------------------ convergence to the exact ODE
def test_third_order_convergence():
    """log-log error slope ~ -3 on uniform-lambda steps for DPM-Solver-3 and DPM-Solver-fast (both forms). fast
    uses NFE = 3K + 2 (orders [3]*K + [2]): with NFE % 3 = 0 or 1 it ends in a first-order step, whose O(h^2)
    local error makes the whole run second order. The data-prediction form is pre-asymptotic below ~40 steps
    (slope 2.76 over 20..160)."""
    ks = [40, 80, 160, 320]
    slopes = {}
    for pred in ("x0", "eps"):
        errs = [_vp_error(DPMSolver3(3 * k, prediction=pred, skip_type="logSNR")) for k in ks]
        slopes[f"dpm_solver3_{pred}"] = _slope(ks, errs)
        errs = [_vp_error(DPMSolverFast(3 * k + 2, prediction=pred, skip_type="logSNR")) for k in ks]
        slopes[f"dpm_solver_fast_{pred}"] = _slope(ks, errs)
        assert errs[-1] < 1e-7
    print("third-order slopes:", {k: round(v, 3) for k, v in slopes.items()})
    for key, val in slopes.items():
        assert abs(val + 3) < 0.3, (key, slopes)


@pytest.mark.parametrize("make,factor", [
    (lambda k: DPMSolver2(2 * k, midpoint="grid", skip_type="time_quadratic"), 3.0),
    (lambda k: DPMSolver2(2 * k, prediction="eps", midpoint="grid", skip_type="time_quadratic"), 3.0),
    (lambda k: DPMSolver3(3 * k, midpoint="grid", skip_type="time_quadratic"), 6.0),
    (lambda k: DPMSolverFast(3 * k + 2, skip_type="time_quadratic"), 6.0),
    (lambda k: DPMSolverFast(3 * k + 2, prediction="eps", skip_type="time_quadratic"), 6.0),
])
def test_grid_rule_keeps_the_order(make, factor):
    """Grid inner points (r != j/p) keep the order: doubling 80 -> 160 steps cuts the error by ~2^p (> 3x for
    p = 2, > 6x for p = 3)."""
    e80, e160 = _vp_error(make(80)), _vp_error(make(160))
    assert e160 < e80 / factor, (e80, e160)


# -------------------------------------------------------------------------------------------- contract and errors
@pytest.mark.parametrize("make", [lambda: DPMSolver3(9), lambda: DPMSolver3(9, prediction="eps", midpoint="grid"),
                                  lambda: DPMSolverFast(10), lambda: DPMSolverFast(7, order=2)])
def test_functional_state_interleaves_and_restarts(make):
    solver = make()
    xa, xb = noise(seed=1), noise(seed=2)
    ref_a, ref_b = run(solver, xa.clone()), run(solver, xb.clone())
    sa, sb = solver.init(xa.clone()), solver.init(xb.clone())
    for k in range(solver.num_evals):
        a, s = solver.alpha_sigma(k)
        sa = solver.update(sa, model_output(solver.model_input(sa, k), a, s), k)
        sb = solver.update(sb, model_output(solver.model_input(sb, k), a, s), k)
        if k + 1 == solver.step_start(1):  # restart a copy at the second step start
            restarted = solver.init(sa.x.clone(), k + 1)
    assert torch.equal(solver.final(sa), ref_a) and torch.equal(solver.final(sb), ref_b)
    for k in range(solver.step_start(1), solver.num_evals):
        a, s = solver.alpha_sigma(k)
        restarted = solver.update(restarted, model_output(solver.model_input(restarted, k), a, s), k)
    assert torch.equal(solver.final(restarted), ref_a)
    with pytest.raises(ValueError, match="first evaluation"):
        solver.init(xa, 1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 3, got 10"):
        DPMSolver3(10)
    with pytest.raises(ValueError, match="midpoint rule"):
        DPMSolver2(20, midpoint="time")
    with pytest.raises(ValueError, match="midpoint rule"):
        DPMSolver3(9, midpoint="time")
    with pytest.raises(ValueError, match="eps"):
        DPMSolverFast(20, prediction="v")
    with pytest.raises(ValueError, match="NFE must be >= 1"):
        DPMSolverFast(0)
    with pytest.raises(ValueError, match="logSNR"):
        DPMSolverFast(20, skip_type="karras")
    with pytest.raises(IndexError, match="out of range"):
        DPMSolverFast(20).step_of(20)


def test_l2c_rejects_three_evaluation_steps():
    """L2C's schedules exist for one or two evaluations per step; the others fail with a clear error."""
    for solver in (DPMSolver3(9), DPMSolverFast(20), DPMSolverFast(4)):
        with pytest.raises(ValueError, match="no L2C schedule"):
            make_schedule(solver)
        with pytest.raises(ValueError, match="no L2C schedule"):
            L2CPolicy(solver=solver)
    # order 2 with an even NFE *is* two evaluations per step: the shifted schedule applies
    assert make_schedule(DPMSolverFast(20, order=2)) == shifted_schedule(10)
    model = perturbed("tiny_uvit")
    policy = L2CPolicy(theta=0.5, solver=DPMSolver2(20, "scaled_linear"))
    with pytest.raises(ValueError, match="7 steps"):  # a dpm20 policy run with DPM-Solver-fast 20
        sample(model, DPMSolverFast(20, "scaled_linear"), policy, torch.randn(1, 4, 8, 8), torch.tensor([1]), 0.4)


def test_sample_and_fora_run_per_evaluation():
    """sample() and FORA drive the new solvers unchanged: FORA interval 1 (every evaluation full) is the uncached
    run bit for bit, interval 2 reuses features and changes it."""
    model = perturbed("tiny_uvit")
    solver = DPMSolverFast(8, "scaled_linear", time_input="scaled")
    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 5])
    ref = sample(model, solver, None, x, y, 0.4)
    assert torch.isfinite(ref).all()
    every = FORAPolicy(interval=1)
    assert torch.equal(sample(model, solver, every, x, y, 0.4), ref)
    assert not torch.equal(sample(model, solver, FORAPolicy(interval=2), x, y, 0.4), ref)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("skip", ["time_uniform", "logSNR", "time_quadratic"])
def test_fast_order2_is_dpm_solver2_grid(prediction, skip):
    """Two implementations of one rule: DPM-Solver-fast at order 2 with an even NFE is DPM-Solver-2 with
    midpoint="grid" (same times; the order-generic update agrees with DPMSolver2's to fp64 round-off)."""
    fast = DPMSolverFast(16, order=2, prediction=prediction, skip_type=skip, t_end=1e-3)
    two = DPMSolver2(16, prediction=prediction, skip_type=skip, midpoint="grid")
    np.testing.assert_allclose(fast.eval_t, two.eval_t, rtol=0, atol=1e-14)  # inverse_lambda round trips: ulps
    assert rel(run(fast, noise()), run(two, noise())) < 1e-13
