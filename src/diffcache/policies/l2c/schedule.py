"""Which evaluations of a run are L2C cache evaluations, which router each reads, what it reuses.

Built only from the solver's ``num_steps``, ``num_evals`` and ``step_of`` (never from its name):

* one evaluation per step (DDIM, DDPM, DPM-Solver++ multistep): *alternating*. Step 0 is full, steps
  1, 3, 5, ... are cache steps, router index = respaced index ``N-1-step`` (the official DiT reads
  even respaced indices 0 .. N-2). Needs even N. ``cache_interval=k > 2`` (beyond the paper): step
  ``s`` is full iff ``s % k == 0`` and the ``k-1`` steps after it reuse that full step.
* two evaluations per step (DPM-Solver-2 singlestep): *shifted*. The first evaluation of each step
  but the first reuses the previous step's midpoint: cache NFEs 3, 5, 7, ... (1-based); router index
  for evaluation ``2j`` is ``j``. The midpoint is never cached (it feeds the solver's derivative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class L2CSchedule:
    """router[e]: router index read by evaluation ``e`` (0-based NFE), None for a full evaluation.
    source[e]: the full evaluation whose branch outputs cache evaluation ``e`` reuses (None if full)."""

    kind: str  # "alternating" | "shifted"
    num_steps: int
    num_evals: int
    cache_interval: int
    router: tuple[int | None, ...]
    source: tuple[int | None, ...]

    @property
    def num_routers(self) -> int:
        """Routers stored, as the official files do: one per evaluation."""
        return self.num_evals

    def is_cache(self, nfe: int) -> bool:
        return self.router[nfe] is not None

    def cache_evals(self) -> list[int]:
        """Cache evaluations in sampling order (0-based NFE)."""
        return [e for e, r in enumerate(self.router) if r is not None]

    def used_routers(self) -> list[int]:
        """Router indices read at inference, in sampling order."""
        return [r for r in self.router if r is not None]

    def consumers(self, nfe: int) -> list[int]:
        """Cache evaluations that reuse what full evaluation ``nfe`` computes."""
        return [e for e, s in enumerate(self.source) if s == nfe]


def alternating_schedule(num_steps: int, cache_interval: int = 2) -> L2CSchedule:
    """One evaluation per step (DDIM, DDPM, DPM-Solver++ multistep)."""
    num_steps, k = int(num_steps), int(cache_interval)
    if k < 2:
        raise ValueError(f"cache_interval must be >= 2 (one full step, then interval-1 cache steps), got {k}")
    if num_steps < 2:
        raise ValueError(f"an L2C schedule needs at least 2 steps, got {num_steps}")
    if k == 2 and num_steps % 2:
        raise ValueError(
            f"the alternating L2C schedule needs an even number of steps, got {num_steps}: steps alternate "
            f"full/cache from a full first step, and the official routers use the even respaced indices "
            f"0, 2, ..., N-2 as cache steps, so the last step (t=0) must be a cache step. Use {num_steps - 1} or "
            f"{num_steps + 1} steps.")
    router = tuple(None if s % k == 0 else num_steps - 1 - s for s in range(num_steps))
    source = tuple(None if s % k == 0 else s - s % k for s in range(num_steps))
    return L2CSchedule("alternating", num_steps, num_steps, k, router, source)


def shifted_schedule(num_steps: int, cache_interval: int = 2) -> L2CSchedule:
    """DPM-Solver-2 singlestep (``num_steps`` steps, 2 evaluations each): cache at 1-based NFE 3, 5, 7, ..."""
    num_steps = int(num_steps)
    if int(cache_interval) != 2:
        raise ValueError(
            f"cache_interval={cache_interval} is only defined for one-evaluation-per-step solvers (DDIM, DDPM, "
            f"DPM-Solver++): with DPM-Solver-2 singlestep every step start already reuses the previous midpoint, "
            f"and a midpoint must never be cached (it feeds the solver's derivative)")
    if num_steps < 2:
        raise ValueError(f"the shifted L2C schedule needs at least 2 solver steps (NFE >= 4), got {num_steps}")
    cache = [e % 2 == 0 and e >= 2 for e in range(2 * num_steps)]
    router = tuple(e // 2 if c else None for e, c in enumerate(cache))
    source = tuple(e - 1 if c else None for e, c in enumerate(cache))
    return L2CSchedule("shifted", num_steps, 2 * num_steps, 2, router, source)


def make_schedule(spec: Any, cache_interval: int = 2) -> L2CSchedule:
    """The schedule of a solver (anything with ``num_steps``, ``num_evals``, ``step_of``), or ``spec`` itself
    if it already is one. One evaluation per step gives the alternating schedule, two the shifted one."""
    if isinstance(spec, L2CSchedule):
        return spec
    if not all(hasattr(spec, a) for a in ("num_steps", "num_evals", "step_of")):
        raise TypeError(f"cannot build an L2C schedule from {type(spec).__name__}: pass a solver (num_steps, "
                        f"num_evals, step_of) or an L2CSchedule")
    n_s, n_e = int(spec.num_steps), int(spec.num_evals)
    per = n_e // n_s if n_s and n_e % n_s == 0 else 0
    regular = per in (1, 2) and all(int(spec.step_of(e)) == e // per for e in range(n_e))
    if not regular:
        raise ValueError(f"no L2C schedule for solver {getattr(spec, 'name', type(spec).__name__)!r}: {n_e} "
                         f"evaluations over {n_s} steps; L2C schedules exist for one evaluation per step (DDIM, "
                         f"DDPM, DPM-Solver++ multistep) and two (DPM-Solver-2 singlestep)")
    return (alternating_schedule if per == 1 else shifted_schedule)(n_s, cache_interval)
