"""Where a router-distillation iteration takes its cache steps, and the per-step loss scale.

``module.draw``:
* ``batch`` -- L2C: one cache step per device batch (on 8 ranks each router gets ~``1 - (1 - 1/M)^8`` of the
  iterations; on one device ``1/M``).
* ``sample`` -- one cache step per sample, stratified: a random offset and permutation spread the batch over
  the cache steps, so each gets ``floor(B/M)`` or ``ceil(B/M)`` samples and, with ``B >= M``, every router is
  trained every iteration (the single-device equivalent of L2C's per-rank draw, equal in expectation).
* ``trajectory`` -- every cache step of each sample's trajectory (:func:`trajectory_terms`): the student's own
  hard-cached trajectory from the start, and at each cache step the teacher and the soft student on that
  state, so one prefix serves all routers (image-free data: HarmoniCa's step-wise training, with one
  optimiser step per trajectory).

The scale of step ``m`` (:func:`cached_step_scales`) is the MSE of the fully-cached student (every site reused)
against the teacher there, on a fixed seeded batch along the teacher's trajectory. Dividing step ``m``'s
loss by it puts every step on one scale (1 = as bad as reusing everything): the last step's raw MSE is ~1e4
times the others' on the MNIST DiT (its eps target is divided by a tiny sigma). Router ``m`` only sees the
loss of step ``m``, and Adam is invariant to a constant rescaling of one parameter's gradient, so the
normalised objective trains the same routers; it changes what the progress bar, the checkpoint choice and a
sweep plot read.
"""
from __future__ import annotations

import torch

from ..data.seeded import seeded_inputs


def stratified_picks(batch_size: int, num_cache: int, g: torch.Generator) -> torch.Tensor:
    """Index into the cache steps for each sample: every step ``floor(B/M)`` or ``ceil(B/M)`` times."""
    offset = int(torch.randint(num_cache, (1,), generator=g))
    perm = torch.randperm(batch_size, generator=g)
    picks = torch.empty(batch_size, dtype=torch.long)
    picks[perm] = (torch.arange(batch_size) + offset) % num_cache
    return picks


def step_mse(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sample squared error over C, H, W (mean or sum, the backbone family's convention) -> [B]."""
    err = (student.float() - teacher.float()).pow(2).flatten(1)
    return err.mean(1) if reduction == "mean" else err.sum(1)


def trajectory_terms(den, solver, policy, state, cond, cache_evals, reduction: str, generator=None) -> dict:
    """``{m: (per-sample MSE [B], sum beta of router m)}`` at every cache step ``m`` of one trajectory.

    Full evaluations compute and record every site (no grad); at a cache step the teacher (policy disabled)
    and the soft student (train mode, with grad) run on the same state, then the hard-routed student (the
    inference rule) advances the trajectory, so later steps see the errors earlier caching causes.
    """
    terms, wanted = {}, set(cache_evals)
    for nfe in range(state.nfe, solver.num_evals):
        x = solver.model_input(state, nfe)
        if nfe in wanted:
            with torch.no_grad(), policy.disabled():
                teacher = den.raw(x, nfe, solver, cond)
            student = den.raw(x, nfe, solver, cond)
            terms[nfe] = (step_mse(student, teacher, reduction), policy.sum_beta(nfe))
            with torch.no_grad(), policy.inference():
                out = den(x, nfe, solver, cond)
        else:
            with torch.no_grad(), policy.recording():
                out = den(x, nfe, solver, cond)
        with torch.no_grad():
            state = solver.update(state, out, nfe, generator=generator)
    return terms


@torch.no_grad()
def cached_step_scales(den, solver, policy, cache_evals, reduction: str, num_samples: int = 8,
                       seed: int = 0) -> dict[int, float]:
    """``{m: MSE of the fully-cached student vs the teacher at m}`` along the teacher's trajectory."""
    backbone = den.backbone
    device = next(backbone.parameters()).device
    noise, cond = seeded_inputs(backbone, range(num_samples), seed, device)
    g = torch.Generator().manual_seed(seed)
    scales, wanted = {}, set(cache_evals)
    was_training = policy.training
    policy.train()  # soft routing, shifted so far that beta = 0: every site reuses its cached output
    try:
        with policy.bound(backbone, solver):
            policy.reset()
            state = solver.init(noise)
            for nfe in range(solver.num_evals):
                x = solver.model_input(state, nfe)
                if nfe in wanted:
                    with policy.disabled():
                        out = den(x, nfe, solver, cond)
                    with policy.soft_threshold(1e30):
                        cached = den.raw(x, nfe, solver, cond)
                    scales[nfe] = float(step_mse(cached, out.raw, reduction).mean())
                else:
                    with policy.recording():
                        out = den(x, nfe, solver, cond)
                state = solver.update(state, out, nfe, generator=g)
    finally:
        policy.train(was_training)
    return {m: (v if v > 0 else 1.0) for m, v in scales.items()}
