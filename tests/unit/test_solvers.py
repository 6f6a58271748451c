"""Solver tests: respacing, eval bookkeeping, golden comparisons with diffusers schedulers, convergence orders
against the exact probability-flow ODE of Gaussian data, input validation and functional state.

All runs are fp64 on a tiny analytic "model": data x0 ~ N(mu, s^2 I), for which the optimal denoiser and the
probability-flow ODE are known in closed form.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcache.solvers import DDIM, DDPM, DPMSolver2, DPMSolverPP2M, ModelOutput, make_solver
from diffcache.solvers.schedules import (DiscreteVP, alphas_cumprod_of, make_betas, respace, space_timesteps)

MU, S, DIM = 0.5, 0.7, 64
DIT_20 = [0, 53, 105, 158, 210, 263, 315, 368, 421, 473, 526, 578, 631, 684, 736, 789, 841, 894, 946, 999]


# ----------------------------------------------------------------------------------------------- analytic model
def exact_eps(x, alpha, sigma):
    """Optimal noise prediction for data N(MU, S^2 I) at x_t = alpha x0 + sigma eps."""
    return sigma * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)


def model_output(x, alpha, sigma, var_values=None):
    eps = exact_eps(x, alpha, sigma)
    return ModelOutput(eps=eps, x0=(x - sigma * eps) / alpha, var_values=var_values)


def fake_var(x):
    """A deterministic learned-range variance channel in [-1, 1]."""
    return torch.tanh(x - MU) * 0.8


def flow(x, a0, s0, a1, s1):
    """Exact probability-flow ODE map from (alpha, sigma) = (a0, s0) to (a1, s1) for Gaussian data."""
    return a1 * MU + math.sqrt(a1 ** 2 * S ** 2 + s1 ** 2) * (x - a0 * MU) / math.sqrt(a0 ** 2 * S ** 2 + s0 ** 2)


def tweedie(x, a, s):
    """E[x0 | x_t]: what a final step to alpha_bar = 1 returns (DDIM's last update is x0 = this)."""
    return MU + a * S ** 2 * (x - a * MU) / (a ** 2 * S ** 2 + s ** 2)


def run(solver, x, generator=None, var=False):
    state = solver.init(x)
    for k in range(solver.num_evals):
        xin = solver.model_input(state, k)
        a, s = solver.alpha_sigma(k)
        state = solver.update(state, model_output(xin, a, s, fake_var(xin) if var else None), k, generator)
    return solver.final(state)


def noise(shape=(2, DIM), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------- schedules
def test_space_timesteps_dit_reference():
    got = list(space_timesteps(1000, "20"))
    assert got == DIT_20 and len(got) == 20
    assert got[:3] == [0, 53, 105] and got[-2:] == [946, 999]
    fifty = sorted(space_timesteps(1000, "50"))
    assert len(fifty) == 50 and fifty[:3] == [0, 20, 41] and fifty[-2:] == [979, 999]
    assert list(space_timesteps(1000, "ddim20")) == list(range(0, 1000, 50))
    assert list(space_timesteps(1000, 20)) == DIT_20
    assert len(space_timesteps(1000, "10,15,20")) == 45
    with pytest.raises(ValueError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_betas_and_respace():
    b = make_betas("linear")
    assert b.dtype == np.float64 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    sl = make_betas("scaled_linear")
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("cosine")
    abar = alphas_cumprod_of(b)
    nb, tmap = respace(abar, DIT_20)
    assert tmap == DIT_20
    np.testing.assert_allclose(alphas_cumprod_of(nb), abar[DIT_20], rtol=1e-12)


def test_discrete_vp():
    abar = alphas_cumprod_of(make_betas("linear"))
    ns = DiscreteVP(alphas_cumprod=abar)
    for n in (0, 17, 500, 999):  # discrete step n sits at t = (n+1)/T
        t = (n + 1) / 1000
        assert ns.marginal_alpha(t) == pytest.approx(math.sqrt(abar[n]), rel=1e-12)
        assert ns.marginal_std(t) == pytest.approx(math.sqrt(1 - abar[n]), rel=1e-10)
    for t in (1e-3, 0.0123, 0.5, 0.97, 1.0):
        assert ns.inverse_lambda(ns.marginal_lambda(t)) == pytest.approx(t, rel=1e-9, abs=1e-12)
    ns2 = DiscreteVP(betas=make_betas("linear"))
    assert ns2.marginal_lambda(0.3) == pytest.approx(ns.marginal_lambda(0.3), rel=1e-12)


# ---------------------------------------------------------------------------------------------------- bookkeeping
def test_eval_counts_and_steps():
    ddim = make_solver("ddim", 20)
    assert ddim.name == "ddim" and ddim.num_evals == ddim.num_steps == 20
    assert ddim.model_times().tolist() == [float(t) for t in DIT_20[::-1]]
    assert ddim.model_times().dtype == torch.float64 and ddim.timestep_map == DIT_20
    assert ddim.step_of(7) == 7 and ddim.step_start(7) == 7

    ddpm = make_solver("ddpm", 250)
    assert ddpm.num_evals == 250 and ddpm.model_times()[0] == 999 and ddpm.model_times()[-1] == 0

    dpm = make_solver("dpm_solver2", 20, "scaled_linear", prediction="x0", skip_type="time_uniform", t_end=1e-3,
                      time_input="scaled")
    assert dpm.name == "dpm_solver2" and dpm.num_evals == dpm.nfe == 20 and dpm.num_steps == 10
    assert dpm.step_of(3) == 1 and dpm.step_start(1) == 2 and dpm.step_of(19) == 9
    mt = dpm.model_times()
    assert len(mt) == 20 and mt[0] == pytest.approx(1000.0) and all(mt[:-1] > mt[1:])
    assert make_solver("dpm_solver2", 20).model_times()[0] == pytest.approx(999.0)  # (t - 1/T) * 1000

    pp = make_solver("dpm_solver_pp", 20, "scaled_linear", skip_type="time_uniform", t_end=1e-3,
                     time_input="discrete")
    assert pp.name == "dpm_solver_pp" and pp.num_evals == pp.num_steps == 20 and pp.step_of(5) == 5
    assert pp.model_times()[0] == pytest.approx(999.0)
    assert DPMSolverPP2M(20).t_end == pytest.approx(1e-3)  # default 1/T as the official multistep


# ------------------------------------------------------------------------------------------- golden: diffusers
def _abar64():
    return torch.tensor(alphas_cumprod_of(make_betas("linear")), dtype=torch.float64)


def test_ddim_matches_diffusers():
    """Our DDIM with "ddim20" spacing vs diffusers' DDIMScheduler (leading spacing, offset 0, alpha_prev=1 at the
    end): both run t = 950, 900, ..., 0. (DiT's "20" *section* spacing keeps 0, 53, ..., 999, a grid diffusers has
    no spacing for: its "linspace"/"trailing" modes still step to prev = t - T//N, so the chains differ.)
    diffusers keeps a float32 alpha_bar; we hand it our float64 table so both compute in fp64."""
    from diffusers import DDIMScheduler

    for eta in (0.0, 0.5):
        sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0, clip_sample=False)
        sch.alphas_cumprod = _abar64()
        sch.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        sch.set_timesteps(20)
        assert sch.timesteps.tolist() == list(range(950, -1, -50))
        x_ref = noise()
        g = torch.Generator().manual_seed(1)
        for t in sch.timesteps:
            a = float(sch.alphas_cumprod[t]) ** 0.5
            x_ref = sch.step(exact_eps(x_ref, a, math.sqrt(1 - a * a)), t, x_ref, eta=eta, generator=g).prev_sample
        solver = DDIM(20, eta=eta, spacing="ddim20")
        assert solver.timesteps == list(range(950, -1, -50))
        ours = run(solver, noise(), generator=torch.Generator().manual_seed(1))
        assert rel(ours, x_ref) < 1e-10, eta


@pytest.mark.parametrize("var", [True, False])
def test_ddpm_matches_diffusers(var):
    """DDPM on the DiT respaced chain vs diffusers' DDPMScheduler given the same custom timesteps (it respaces
    beta as 1 - abar_t/abar_prev like ADM); learned_range with variance channels, or fixed_small without."""
    from diffusers import DDPMScheduler

    n = 10
    solver = DDPM(n)
    sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        variance_type="learned_range" if var else "fixed_small")
    sch.set_timesteps(timesteps=solver.timesteps)
    sch.alphas_cumprod = _abar64()
    sch.one = torch.tensor(1.0, dtype=torch.float64)
    shape = (2, 4, 4, 4)
    x_ref, g = noise(shape), torch.Generator().manual_seed(3)
    for t in sch.timesteps:
        a = float(sch.alphas_cumprod[t]) ** 0.5
        eps = exact_eps(x_ref, a, math.sqrt(1 - a * a))
        out = torch.cat([eps, fake_var(x_ref)], 1) if var else eps
        x_ref = sch.step(out, t, x_ref, generator=g).prev_sample
    ours = run(solver, noise(shape), generator=torch.Generator().manual_seed(3), var=var)
    assert rel(ours, x_ref) < 1e-10


def _dpm_sigmas(times, ns):
    """diffusers parametrises the VP marginal by sigma/alpha; this is ours at the given continuous times."""
    return torch.tensor([ns.marginal_std(t) / ns.marginal_alpha(t) for t in times], dtype=torch.float64)


def _run_diffusers(sch, x, n_steps):
    sch.set_begin_index(0)
    for i in range(n_steps):
        sig = float(sch.sigmas[i])
        a = 1.0 / math.sqrt(sig * sig + 1.0)
        x = sch.step(exact_eps(x, a, sig * a), sch.timesteps[i], x).prev_sample
    return x


@pytest.mark.parametrize("K", [9, 27])
def test_dpmpp_2m_matches_diffusers_on_its_own_grid(K):
    """With t_end = 1/T and K | 999 our uniform times land on the integer grid 999, 999-999/K, ..., 0 that
    diffusers samples with custom timesteps and final_sigmas_type='sigma_min' (its last sigma is t=0). For K=9 both
    take a first-order last step (official: steps < 10; diffusers: lower_order_final and < 15 steps), for K=27
    neither does. diffusers runs this scheduler in float32 internally, hence the 1e-4 tolerance."""
    from diffusers import DPMSolverMultistepScheduler

    solver = DPMSolverPP2M(K)
    grid = [round(t) for t in solver.model_times().tolist()]
    assert grid == list(range(999, 0, -999 // K))
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=2,
                                      algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                      final_sigmas_type="sigma_min")
    sch.set_timesteps(timesteps=grid)
    x_ref = _run_diffusers(sch, noise(), K)
    assert rel(run(solver, noise()), x_ref.double()) < 1e-4


@pytest.mark.parametrize("K", [8, 20])
def test_dpmpp_2m_matches_diffusers_same_sigmas(K):
    """PixArt's configuration (t_end=1e-3, time-uniform, off the integer grid): diffusers is given our sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    solver = DPMSolverPP2M(K, "scaled_linear", t_end=1e-3)
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", solver_order=2,
                                      algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                      final_sigmas_type="sigma_min")
    sch.set_timesteps(K)
    sch.sigmas = _dpm_sigmas(solver.times, solver.ns)
    x_ref = _run_diffusers(sch, noise(), K)
    assert rel(run(solver, noise()), x_ref.double()) < 1e-4


@pytest.mark.filterwarnings("ignore:.*dpmsolver.*deprecated:FutureWarning")
@pytest.mark.parametrize("prediction,algo", [("x0", "dpmsolver++"), ("eps", "dpmsolver")])
@pytest.mark.parametrize("skip", ["time_uniform", "logSNR"])
def test_dpm_solver2_matches_diffusers_singlestep(prediction, algo, skip):
    """DPM-Solver-2 vs diffusers' DPMSolverSinglestepScheduler(order 2): diffusers treats the midpoint as its own
    timestep (orders 1, 2, 1, 2, ...), so it gets the 2K+1 sigmas t_0, s_0, t_1, ..., s_{K-1}, t_K. Its
    second-order update with r0 = (lambda_s - lambda_t)/h is exactly the r1 = 1/2 'dpmsolver' correction."""
    from diffusers import DPMSolverSinglestepScheduler

    solver = DPMSolver2(20, "scaled_linear", prediction=prediction, skip_type=skip, time_input="scaled")
    times = list(solver.eval_t) + [solver.times[-1]]
    sch = DPMSolverSinglestepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", solver_order=2,
                                       algorithm_type=algo, solver_type="midpoint", lower_order_final=False,
                                       final_sigmas_type="sigma_min")
    sch.set_timesteps(20)
    assert sch.order_list == [1, 2] * 10
    sch.sigmas = _dpm_sigmas(times, solver.ns)
    x_ref = _run_diffusers(sch, noise(), 20)
    assert rel(run(solver, noise()), x_ref) < 1e-10


# ------------------------------------------------------------------------------------ convergence to the exact ODE
def _slope(ns_, errs):
    return float(np.polyfit(np.log(ns_), np.log(errs), 1)[0])


def _ddim_error(n):
    """DDIM runs the discrete chain from alpha_bar[999] to alpha_bar[0] and its last update (to alpha_bar = 1)
    returns the x0 prediction there, so it converges to Tweedie(exact flow 999 -> 0), not to the flow to sigma=0
    (the last step is the same for every N: it is part of the endpoint, not of the discretisation error)."""
    solver = DDIM(n)
    x = noise()
    a_T, s_T = solver.alpha_sigma(0)
    a_0, s_0 = solver.alpha_sigma(n - 1)
    ref = tweedie(flow(x, a_T, s_T, a_0, s_0), a_0, s_0)
    return rel(run(solver, x), ref)


def _vp_error(solver):
    """DPM solvers integrate the ODE in lambda from t=1 to t_end exactly up to discretisation error."""
    x = noise()
    a_T, s_T = solver.ns.alpha_sigma(solver.times[0])
    a_e, s_e = solver.ns.alpha_sigma(solver.times[-1])
    return rel(run(solver, x), flow(x, a_T, s_T, a_e, s_e))


SLOPES: dict[str, float] = {}


def test_convergence_orders():
    """log-log error slope vs step count: 1 for DDIM, 2 for DPM-Solver-2 (both forms) and DPM-Solver++ 2M.

    DDIM uses DiT section spacing (uniform in the discrete index, 1 ulp of rounding aside). The DPM solvers use
    logSNR steps, i.e. uniform h in lambda, where the asymptotic regime holds from ~20 steps (time-uniform
    steps put an O(1) lambda-step next to t_end for any practical K with the linear schedule)."""
    steps = [25, 50, 100, 200]
    errs = [_ddim_error(n) for n in steps]
    SLOPES["ddim"] = _slope(steps, errs)

    ks = [20, 40, 80, 160]
    for pred in ("x0", "eps"):
        errs = [_vp_error(DPMSolver2(2 * k, prediction=pred, skip_type="logSNR")) for k in ks]
        SLOPES[f"dpm_solver2_{pred}"] = _slope(ks, errs)
        assert errs[-1] < 5e-4
    errs = [_vp_error(DPMSolverPP2M(k, skip_type="logSNR")) for k in ks]
    SLOPES["dpm_solver_pp"] = _slope(ks, errs)
    assert errs[-1] < 5e-4
    print("convergence slopes:", {k: round(v, 3) for k, v in SLOPES.items()})
    assert abs(SLOPES["ddim"] + 1) < 0.3, SLOPES
    for key in ("dpm_solver2_x0", "dpm_solver2_eps", "dpm_solver_pp"):
        assert abs(SLOPES[key] + 2) < 0.3, SLOPES


@pytest.mark.parametrize("skip", ["time_uniform", "time_quadratic"])
def test_dpm_solvers_converge_for_other_skip_types(skip):
    """Second order also on the other grids: doubling the steps from 80 to 160 cuts the error by > 3x (time-uniform
    DPM-Solver++ 2M is pre-asymptotic below ~60 steps: its last lambda-step next to t_end stays O(1))."""
    for make in (lambda k: DPMSolver2(2 * k, skip_type=skip),
                 lambda k: DPMSolver2(2 * k, prediction="eps", skip_type=skip),
                 lambda k: DPMSolverPP2M(k, skip_type=skip)):
        e80, e160 = _vp_error(make(80)), _vp_error(make(160))
        assert e160 < e80 / 3 and e160 < 5e-3, (e80, e160)


# -------------------------------------------------------------------------------------------------------- errors
def test_bad_inputs():
    with pytest.raises(ValueError, match="even NFE, got 19"):
        make_solver("dpm_solver2", 19)
    with pytest.raises(ValueError, match="1000"):
        make_solver("ddim", 1001)
    with pytest.raises(ValueError, match="1000"):
        make_solver("ddpm", 0)
    with pytest.raises(ValueError, match="1000"):
        make_solver("dpm_solver_pp", 1001)
    with pytest.raises(ValueError, match="timesteps"):
        make_solver("dpm_solver2", 2002)
    with pytest.raises(ValueError, match="logSNR"):
        make_solver("dpm_solver2", 20, skip_type="karras")
    with pytest.raises(ValueError, match="time_uniform"):
        make_solver("dpm_solver_pp", 20, skip_type="uniform")
    with pytest.raises(ValueError, match="dpm_solver_pp"):
        make_solver("heun", 20)
    with pytest.raises(ValueError, match="spacing"):
        make_solver("ddim", 20, bogus=1)
    with pytest.raises(ValueError, match="eta"):
        make_solver("dpm_solver2", 20, eta=0.5)
    with pytest.raises(ValueError, match="scaled"):
        make_solver("dpm_solver2", 20, time_input="continuous")
    with pytest.raises(ValueError, match="eps"):
        make_solver("dpm_solver2", 20, prediction="v")
    with pytest.raises(ValueError, match="keeps 50"):
        DDIM(20, spacing="ddim50")
    s = make_solver("ddim", 10)
    with pytest.raises(ValueError, match="expects evaluation 0"):
        s.update(s.init(noise()), model_output(noise(), 0.5, 0.5), 3)


# -------------------------------------------------------------------------------------------- functional state
@pytest.mark.parametrize("make", [lambda: DDIM(10, eta=0.3), lambda: DDPM(10), lambda: DPMSolver2(10),
                                  lambda: DPMSolver2(10, prediction="eps"), lambda: DPMSolverPP2M(10)])
def test_interleaved_trajectories(make):
    solver = make()
    xa, xb = noise(seed=1), noise(seed=2)
    ref_a = run(solver, xa.clone(), torch.Generator().manual_seed(5), var=True)
    ref_b = run(solver, xb.clone(), torch.Generator().manual_seed(6), var=True)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    sa, sb = solver.init(xa.clone()), solver.init(xb.clone())
    for k in range(solver.num_evals):
        a, s = solver.alpha_sigma(k)
        for which in ("a", "b"):
            st, g = (sa, ga) if which == "a" else (sb, gb)
            before = st.x.clone()
            xin = solver.model_input(st, k)
            new = solver.update(st, model_output(xin, a, s, fake_var(xin)), k, g)
            assert torch.equal(st.x, before)  # the input state is not mutated
            if which == "a":
                sa = new
            else:
                sb = new
    assert torch.equal(solver.final(sa), ref_a) and torch.equal(solver.final(sb), ref_b)


def test_restart_from_step_start():
    """init(x, start) at a step start continues from there (router distillation restarts mid-trajectory)."""
    solver = DPMSolver2(10)
    x = noise()
    state = solver.init(x)
    for k in range(4):
        a, s = solver.alpha_sigma(k)
        state = solver.update(state, model_output(solver.model_input(state, k), a, s), k)
    restarted = solver.init(state.x.clone(), solver.step_start(2))
    for k in range(4, solver.num_evals):
        a, s = solver.alpha_sigma(k)
        state = solver.update(state, model_output(solver.model_input(state, k), a, s), k)
        restarted = solver.update(restarted, model_output(solver.model_input(restarted, k), a, s), k)
    assert torch.allclose(state.x, restarted.x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="first evaluation"):
        solver.init(x, 3)
