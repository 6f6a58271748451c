"""Compute budgets for L2C routers (beyond the paper; ``policy.budget=``).

The budget is the fraction of branch MACs that cache evaluations keep. :func:`budget_masks` ranks the
learned logits and keeps the top sites globally (one theta for all steps) or per step (top-k in each
router), so no magic theta is needed. MAC weights per kind default to attn 1 : mlp 2 (DiT-style
4ND^2 vs 8ND^2, attention-score matmuls not counted, as in the paper) and xattn 1 (2ND^2 + 2LD^2,
exact when the text length L equals the token count N; PixArt-alpha-256 with L=120 is ~0.73).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

DEFAULT_SITE_COST = {"attn": 1.0, "xattn": 1.0, "mlp": 2.0}


def site_costs(site_kinds: Sequence[str], depth: int, site_cost: Mapping[str, float] | None = None) -> torch.Tensor:
    """MAC weight of every router entry (float64, ``depth * len(site_kinds)``), layer-major."""
    cost = {**DEFAULT_SITE_COST, **dict(site_cost or {})}
    missing = [k for k in site_kinds if k not in cost]
    if missing:
        raise ValueError(f"no MAC weight for site kinds {missing}; pass site_cost={{kind: weight}}")
    return torch.tensor([float(cost[k]) for k in site_kinds] * int(depth), dtype=torch.float64)


def _keep_top(logits: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Boolean keep-mask of the highest logits whose cost first reaches ``budget * total``."""
    flat, c = logits.reshape(-1).double(), costs.reshape(-1).double()
    order = torch.sort(flat, descending=True, stable=True).indices
    cum = torch.cumsum(c[order], 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    target = budget * total
    tol = 1e-12 * max(total, 1.0)
    k = 0 if target <= tol else min(int((cum < target - tol).sum()) + 1, flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(logits.shape)


def budget_masks(logits: Sequence[torch.Tensor] | torch.Tensor, routers: Sequence[int], costs: torch.Tensor,
                 budget: float, per_step: bool = False) -> tuple[float | None, dict[int, torch.Tensor]]:
    """Choose what cache evaluations compute so they keep ``budget`` (0..1) of their branch MACs.

    logits: all routers (list of [S] or [R, S]); routers: the router indices the schedule reads; costs:
    [S] MAC weight per entry (:func:`site_costs`, or ones for a site count). Sites are ranked by logit
    (monotone in beta, and free of fp32 sigmoid saturation), highest first, and kept until the kept cost
    reaches the target (never below it). ``per_step=False``: one ranking over all cache steps (a global
    theta); ``per_step=True``: top-k within each router.

    Returns ``(theta, masks)``: ``masks[r]`` is a bool [S] tensor, True = compute. ``theta`` (global mode)
    is ``sigmoid`` of the best dropped logit, so the inference rule ``sigmoid > theta`` gives the same mask
    unless scores tie at the boundary (0.0 when everything is kept; None in per-step mode).
    """
    if not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"budget is the fraction of cache-step branch MACs to keep, in [0, 1]; got {budget}")
    routers = list(routers)
    if not routers:
        return (0.0 if not per_step else None), {}
    L = torch.stack([torch.as_tensor(logits[r]).detach().cpu().double().reshape(-1) for r in routers])
    costs = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
    if costs.numel() != L.shape[1]:
        raise ValueError(f"costs has {costs.numel()} entries, routers have {L.shape[1]}")
    if per_step:
        keep = torch.stack([_keep_top(L[i], costs, budget) for i in range(len(routers))])
        theta = None
    else:
        keep = _keep_top(L, costs.expand_as(L), budget)
        dropped = L[~keep]
        theta = 0.0 if dropped.numel() == 0 else float(torch.sigmoid(dropped.max()))
    return theta, {r: keep[i].clone() for i, r in enumerate(routers)}


def theta_for_budget(logits, routers, costs, budget: float) -> float:
    """The global theta of :func:`budget_masks`."""
    return budget_masks(logits, routers, costs, budget, per_step=False)[0]
