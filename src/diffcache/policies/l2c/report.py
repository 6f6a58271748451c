"""What an L2C policy caches, as numbers for summaries and loggers (at its theta, or its budget)."""
from __future__ import annotations

from typing import Any

import torch

from .budget import site_costs


def cache_stats(policy, theta: float | None = None, solver: Any = None) -> dict[str, Any]:
    """Cached sites over the schedule's cache evaluations: total, per kind, per cache evaluation."""
    sched = policy.schedule_for(solver)
    masks = policy.inference_masks(theta)
    per_eval = {}
    per_kind = {k: 0 for k in policy.site_kinds}
    K = len(policy.site_kinds)
    for e in sched.cache_evals():
        m = masks[sched.router[e]]
        per_eval[e] = sum(1 for x in m if not x)
        for j, x in enumerate(m):
            if not x:
                per_kind[policy.site_kinds[j % K]] += 1
    return {"cached": sum(per_eval.values()), "cacheable": len(per_eval) * policy.num_sites, "per_kind": per_kind,
            "per_eval": per_eval}


def summary(policy, solver: Any = None) -> dict[str, float]:
    """Flat floats for loggers: cached / cacheable at the current theta (or budget), per kind, MACs kept."""
    sched = policy.schedule_for(solver)
    st = policy.cache_stats()
    masks = policy.inference_masks()
    costs = site_costs(policy.site_kinds, policy.num_sites // len(policy.site_kinds), policy.site_cost)
    kept = sum(float(costs[torch.tensor(masks[sched.router[e]])].sum()) for e in sched.cache_evals())
    total = float(costs.sum()) * len(sched.cache_evals())
    used = sorted(set(sched.used_routers()))
    out = {"cached": float(st["cached"]), "cacheable": float(st["cacheable"]),
           "cached_fraction": st["cached"] / max(st["cacheable"], 1),
           "cache_step_macs_kept": kept / total if total else 1.0,
           "mean_beta": float(policy.betas()[used].mean()) if used else 0.0}
    theta = policy.effective_theta()
    if theta is not None:
        out["theta_effective"] = float(theta)
    out.update({f"cached_{k}": float(v) for k, v in st["per_kind"].items()})
    return out
