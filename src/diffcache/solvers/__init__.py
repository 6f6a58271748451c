"""Diffusion solvers behind one functional contract (:mod:`.base`).

Configs build them with Hydra (``solver._target_``); :func:`make_solver` is the same for Python callers:
``ddim`` / ``ddpm`` run DiT-respaced discrete chains; ``dpm_solver2`` / ``dpm_solver3`` / ``dpm_solver_fast``
(singlestep, ``num_steps`` = NFE) and ``dpm_solver_pp`` (2M multistep) run on the continuous VP view of
the same discrete schedule.
"""
from __future__ import annotations

import inspect

from .base import ModelOutput, Solver, SolverState
from .ddim import DDIM
from .ddpm import DDPM
from .dpm_singlestep import DPMSolver3, DPMSolverFast
from .dpm_solver import DPMSolver2, DPMSolverPP2M

CLASSES = {cls.name: cls for cls in (DDIM, DDPM, DPMSolver2, DPMSolverPP2M, DPMSolver3, DPMSolverFast)}
ALGORITHMS = tuple(CLASSES)


def make_solver(algorithm: str, num_steps: int, schedule: str = "linear", **kw) -> Solver:
    """``CLASSES[algorithm](num_steps, schedule=schedule, **kw)``; an argument the class does not take is a ValueError that
    lists the ones it does (read from its signature). ``None`` values are dropped."""
    if algorithm not in CLASSES:
        raise ValueError(f"unknown solver algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    cls = CLASSES[algorithm]
    takes = [p for p in inspect.signature(cls).parameters if p not in ("num_steps", "schedule")]
    kw = {k: v for k, v in kw.items() if v is not None}
    bad = sorted(set(kw) - set(takes))
    if bad:
        raise ValueError(f"solver {algorithm!r} does not take {bad}; it takes {takes}")
    return cls(int(num_steps), schedule=schedule, **kw)


__all__ = ["ALGORITHMS", "CLASSES", "DDIM", "DDPM", "DPMSolver2", "DPMSolver3", "DPMSolverFast", "DPMSolverPP2M", "ModelOutput", "Solver",
           "SolverState", "make_solver"]
