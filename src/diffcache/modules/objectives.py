"""Router-training objectives beyond L2C's per-step MSE (``module.objective``; L2C's ``l2c`` stays default).

``iepo`` -- HarmoniCa's Image Error Proxy-Guided Objective: the MSE at cache evaluation ``m`` is weighted by
    ``lambda(m) = mean((x0_m - x0_prev)^2)``, the change of the *final* sample when caching is switched on
    at ``m`` too, given caching is already on at every earlier cache evaluation (HarmoniCa's ``get_lambda``:
    start from an uncached generation, enable one step at a time in sampling order). Gradient-free
    generation passes, refreshed every ``iepo_every`` iterations; masks are the current routers thresholded
    at ``theta`` (the inference rule). Raw, unnormalised weights as in HarmoniCa (``iepo_normalize`` divides by
    their mean, an option of ours).
``budget`` -- one run for a whole range of budgets: every iteration draws a budget ``b`` and routes softly
    around the logit threshold that keeps ``b`` of the cache-step MACs (``beta = sigmoid((logit - tau_b) / T)``),
    so what is learned is a *ranking* of sites that is good at every budget; at inference ``policy.budget=b``
    picks the top sites of that ranking (:func:`~diffcache.policies.l2c.budget.budget_masks`).
``trajectory`` -- the error of the final sample of the whole cached trajectory, at a fixed MAC budget
    (:mod:`.trajectory`), optionally starting from the searched schedule.
"""
from __future__ import annotations

import math

import torch

from ..data.seeded import seeded_inputs
from ..policies.l2c.budget import budget_masks
from ..sampling import sample

OBJECTIVES = ("l2c", "iepo", "budget", "trajectory")


@torch.no_grad()
def iepo_weights(backbone, solver, policy, num_samples: int = 8, guidance: float | None = None,
                 seed: int = 0) -> dict[int, float]:
    """``{cache evaluation m: lambda(m)}`` on a fixed seeded batch (the same on every rank)."""
    noise, cond = seeded_inputs(backbone, range(num_samples), seed, next(backbone.parameters()).device)

    def final():
        return sample(backbone, solver, policy, noise, cond, guidance,
                      generator=torch.Generator().manual_seed(seed)).float()

    weights, on = {}, []
    with policy.caching_only(on):
        prev = final()
    for m in policy.trainable_evals(solver):
        on.append(m)
        with policy.caching_only(on):
            now = final()
        weights[m] = float((now - prev).pow(2).mean())
        prev = now
    return weights


def budget_shift(policy, budget: float) -> float:
    """The logit threshold ``tau_b``: sites above it are the top sites that keep ``budget`` of the MACs."""
    routers = sorted(set(policy.schedule_for().used_routers()))
    theta, _ = budget_masks([p.detach() for p in policy.routers], routers, policy.costs(), float(budget))
    theta = min(max(theta, 1e-9), 1 - 1e-9)
    return math.log(theta / (1 - theta))
