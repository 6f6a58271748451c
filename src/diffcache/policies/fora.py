"""FORA (Selvaraju et al., 2024): static reuse of every branch output between full evaluations.

The cycle is the one ToCa's code runs for FORA (``fresh_ratio = 0``, toca.md §1.8): the first
evaluation is full; afterwards evaluation ``e`` is full iff ``i % interval == 0`` where ``i`` is the
*count-down* index ``num_evals - 1 - e`` (DiT's loop index). DiT DDIM-50 with interval 3 is full at
``i = 49, 48, 45, ..., 3, 0`` (18 of 50), which gives ToCa's 8.56 TFLOPs figure. On other evaluations
every branch of every layer returns its cached *ungated* output (the backbone applies the current gate).

Counting (a choice): evaluations are counted, not solver steps. For DPM-Solver-2 singlestep (two
evaluations per step) the step start and the midpoint are slots like any other; with an even number
of evaluations and ``interval=2`` this makes every midpoint full and every later step start reuse the
previous midpoint -- the pattern L2C uses for that solver. ``direction="up"`` (``e % interval == 0``)
is available. ``interval=1`` is the uncached model. Caches are kept per CFG branch.
"""
from __future__ import annotations

import torch

from .base import CachePolicy


def fora_full_evals(num_evals: int, interval: int, direction: str = "down") -> list[bool]:
    """``full[e]`` for each evaluation of a run."""
    E, N = int(num_evals), int(interval)
    out = []
    for e in range(E):
        i = E - 1 - e if direction == "down" else e
        out.append(e == 0 or i % N == 0)
    return out


class FORAPolicy(CachePolicy):
    name = "fora"

    def __init__(self, interval: int = 3, direction: str = "down") -> None:
        super().__init__()
        if int(interval) < 1:
            raise ValueError(f"FORA interval must be >= 1, got {interval}")
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
        self.interval = int(interval)
        self.direction = direction
        self.geometry = None  # (depth, site_kinds), from the layout a run (or compute_mask) prepares
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._plans: dict[int, list[bool]] = {}
        self.decision: bool | None = None  # this evaluation computes (and stores) every branch

    def prepare(self, layout, solver=None) -> None:
        self.geometry = (int(layout.depth), tuple(layout.site_kinds))

    def full(self, num_evals: int) -> list[bool]:
        plan = self._plans.get(int(num_evals))
        if plan is None:
            plan = self._plans[int(num_evals)] = fora_full_evals(num_evals, self.interval, self.direction)
        return plan

    def reset(self) -> None:
        self._cache.clear()
        self.decision = None

    def begin(self, ctx) -> None:
        super().begin(ctx)
        # the evaluation's one static choice (the site reads nothing else): a compiled forward has two graphs
        self.decision = bool(self.full(ctx.num_evals)[ctx.nfe])
        if self.geometry is not None and (ctx.branch, 0, self.geometry[1][0]) not in self._cache:
            # every key present from the start (None until stored): the cache's shape never changes in a run
            depth, kinds = self.geometry
            self._cache.update({(ctx.branch, layer, kind): None for layer in range(depth) for kind in kinds})

    def apply(self, layer: int, kind: str, branch) -> torch.Tensor:
        ctx = self.ctx
        key = (ctx.branch, layer, kind)
        full = self.decision if self.decision is not None else self.full(ctx.num_evals)[ctx.nfe]  # ctx set by hand
        if full:
            out = branch()
            self._cache[key] = out
            return out
        out = self._cache.get(key)  # reused: the branch (its norm and modulation too) is never evaluated
        if out is None:
            raise RuntimeError(f"FORA: no cached output for layer {layer} '{kind}' (branch {ctx.branch!r}) at nfe "
                               f"{ctx.nfe}; a run must start at its first evaluation")
        if out.shape[0] != branch.x.shape[0]:
            raise RuntimeError(f"FORA cache holds a batch of {out.shape[0]} but this evaluation runs {branch.x.shape[0]}")
        return out

    def compute_mask(self, layout=None, solver=None) -> dict[tuple[int, int, str], float]:
        if layout is not None:
            self.prepare(layout)
        if self.geometry is None:
            raise ValueError("FORAPolicy has no layout yet: bind it to a backbone or pass layout=")
        depth, kinds = self.geometry
        num_evals = solver.num_evals if hasattr(solver, "num_evals") else int(solver)
        full = self.full(num_evals)
        return {(e, layer, kind): 1.0 if full[e] else 0.0
                for e in range(int(num_evals)) for layer in range(depth) for kind in kinds}

    def summary(self, layout=None, solver=None) -> dict[str, float]:
        n = getattr(solver, "num_evals", solver) if solver is not None else (
            self.ctx.num_evals if self.ctx is not None else None)
        if n is None:
            return {"interval": float(self.interval)}
        full = self.full(n)
        return {"interval": float(self.interval), "full_eval_frac": sum(full) / len(full)}

    def extra_repr(self) -> str:
        return f"interval={self.interval}, direction={self.direction!r}"


__all__ = ["FORAPolicy", "fora_full_evals"]
